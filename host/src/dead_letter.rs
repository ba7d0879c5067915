//! The dead-letter queue: change events a pipeline gave up on, kept in Postgres so the
//! pipeline can move past them and an operator can look at them, replay them through a fixed
//! handler, or purge them.
//!
//! A pipeline with `on_failure = dead-letter` that meets a batch failing for a reason that is
//! not an outage (the handler's error or trap, a refused write) splits it to find the events
//! that fail on their own; each of those becomes a [`DeadLetter`] recorded here, in the same
//! table for every pipeline of a database (`pgstream_dead_letters`, one row per slot and
//! event), before the pipeline confirms past it. Recording is idempotent: a replayed batch
//! that fails again on the same event adds to its row's attempt count instead of adding a
//! row, keyed by the slot, the commit LSN and a digest of the event.
//!
//! The event is stored whole (as JSON: its relation's columns, its row and old row, its
//! position), so `replay` can rebuild the [`ChangeEvent`] exactly as the handler first saw it.

use std::sync::Arc;

use bytes::Bytes;
use deadpool_postgres::Pool;
use serde_json::{Value as Json, json};
use sha2::{Digest, Sha256};

use crate::event::{ChangeEvent, Column, Operation, Relation, Value};
use crate::lsn::Lsn;

/// The table dead letters are kept in, in the public schema of the chosen database.
pub const TABLE: &str = "pgstream_dead_letters";

/// What a pipeline does with a batch that keeps failing for a reason that is not an outage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnFailure {
    /// Stop without confirming the batch (the default): nothing moves until someone fixes the
    /// handler or the data.
    #[default]
    Stop,
    /// Find the events that fail on their own, record them in the dead-letter table, handle the
    /// others and go on.
    DeadLetter,
}

/// One event the pipeline gave up on.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The event as the handler got it.
    pub event: ChangeEvent,
    /// The last failure, one line.
    pub error: String,
    /// Tries made on the event alone.
    pub attempts: u32,
}

/// A dead letter as stored.
#[derive(Debug, Clone)]
pub struct StoredLetter {
    /// Row id, for `purge --id`.
    pub id: i64,
    /// The pipeline that recorded it.
    pub pipeline: String,
    /// Commit LSN of the event's transaction.
    pub lsn: Lsn,
    /// `schema.table`.
    pub table: String,
    /// `insert`, `update`, ...
    pub operation: String,
    /// The row's key values, when the event has them.
    pub key: Option<Json>,
    /// The last failure.
    pub error: String,
    /// Tries in all (the pipeline's and the replays').
    pub attempts: i32,
    /// When it last failed, as Postgres prints a timestamptz.
    pub failed_at: String,
    /// The event, rebuilt.
    pub event: ChangeEvent,
}

/// Why the dead-letter table could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    /// The database could not be reached.
    #[error("cannot reach the dead-letter database")]
    Unavailable(#[source] deadpool_postgres::PoolError),
    /// A statement failed.
    #[error("dead-letter table {TABLE}")]
    Sql(#[from] tokio_postgres::Error),
    /// A stored event cannot be rebuilt (written by a newer host, or edited by hand).
    #[error("dead letter {id} holds an event this host cannot read: {problem}")]
    Corrupt {
        /// Row id.
        id: i64,
        /// What is wrong.
        problem: String,
    },
}

impl DeadLetterError {
    /// Whether trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            DeadLetterError::Unavailable(_) => true,
            DeadLetterError::Sql(error) => error.as_db_error().is_none(),
            DeadLetterError::Corrupt { .. } => false,
        }
    }
}

/// The dead-letter table of one database.
#[derive(Clone)]
pub struct DeadLetterStore {
    pool: Pool,
    /// Where it is, for messages (`user@host:port/db`, no password).
    location: Arc<str>,
}

impl std::fmt::Debug for DeadLetterStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetterStore")
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS pgstream_dead_letters (
    id              bigserial PRIMARY KEY,
    slot            text        NOT NULL,
    pipeline        text        NOT NULL,
    lsn             pg_lsn      NOT NULL,
    xid             bigint      NOT NULL,
    schema_name     text        NOT NULL,
    table_name      text        NOT NULL,
    operation       text        NOT NULL,
    point_key       jsonb,
    event           jsonb       NOT NULL,
    digest          text        NOT NULL,
    error           text        NOT NULL,
    attempts        integer     NOT NULL,
    first_failed_at timestamptz NOT NULL DEFAULT now(),
    failed_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (slot, lsn, digest)
)";

impl DeadLetterStore {
    /// The table in the database `pool` connects to; nothing is touched until it is used.
    pub fn new(pool: Pool, location: &str) -> DeadLetterStore {
        DeadLetterStore {
            pool,
            location: Arc::from(location),
        }
    }

    /// Where the table is (`user@host:port/db`).
    pub fn location(&self) -> &str {
        &self.location
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, DeadLetterError> {
        self.pool.get().await.map_err(DeadLetterError::Unavailable)
    }

    /// Creates the table when it is missing.
    pub async fn prepare(&self) -> Result<(), DeadLetterError> {
        self.client().await?.batch_execute(CREATE_TABLE).await?;
        Ok(())
    }

    /// Records `letters` of the pipeline `pipeline` reading `slot`, in one transaction: all or
    /// none. A letter already recorded (same slot, LSN and event) gets its error replaced and
    /// its attempts added instead of a second row.
    pub async fn record(
        &self,
        pipeline: &str,
        slot: &str,
        letters: &[DeadLetter],
    ) -> Result<(), DeadLetterError> {
        let mut client = self.client().await?;
        client.batch_execute(CREATE_TABLE).await?;
        let transaction = client.transaction().await?;
        let statement = transaction
            .prepare(
                "INSERT INTO pgstream_dead_letters (slot, pipeline, lsn, xid, schema_name,
                     table_name, operation, point_key, event, digest, error, attempts)
                 VALUES ($1, $2, $3::text::pg_lsn, $4, $5, $6, $7, $8::text::jsonb,
                         $9::text::jsonb, $10, $11, $12)
                 ON CONFLICT (slot, lsn, digest) DO UPDATE
                 SET error = EXCLUDED.error, pipeline = EXCLUDED.pipeline,
                     attempts = pgstream_dead_letters.attempts + EXCLUDED.attempts,
                     failed_at = now()",
            )
            .await?;
        for letter in letters {
            let event = &letter.event;
            let encoded = event_json(event).to_string();
            let digest = hex(&Sha256::digest(encoded.as_bytes()));
            let key = point_key(event).map(|key| key.to_string());
            transaction
                .execute(
                    &statement,
                    &[
                        &slot,
                        &pipeline,
                        &event.lsn.to_string(),
                        &i64::from(event.xid),
                        &event.relation.schema,
                        &event.relation.table,
                        &operation_name(event.operation),
                        &key,
                        &encoded,
                        &digest,
                        &letter.error,
                        &i32::try_from(letter.attempts).unwrap_or(i32::MAX),
                    ],
                )
                .await?;
        }
        transaction.commit().await?;
        Ok(())
    }

    /// The dead letters of `slot`, oldest first; `id` narrows to one. An empty list when the
    /// table does not exist yet.
    pub async fn list(
        &self,
        slot: &str,
        id: Option<i64>,
    ) -> Result<Vec<StoredLetter>, DeadLetterError> {
        let client = self.client().await?;
        if !table_exists(&client).await? {
            return Ok(Vec::new());
        }
        let rows = client
            .query(
                "SELECT id, pipeline, lsn::text, schema_name || '.' || table_name, operation,
                        point_key::text, error, attempts, failed_at::text, event::text
                 FROM pgstream_dead_letters
                 WHERE slot = $1 AND ($2::bigint IS NULL OR id = $2)
                 ORDER BY lsn, id",
                &[&slot, &id],
            )
            .await?;
        rows.iter()
            .map(|row| {
                let id: i64 = row.get(0);
                let corrupt = |problem: String| DeadLetterError::Corrupt { id, problem };
                let lsn: String = row.get(2);
                let key: Option<String> = row.get(5);
                let event: String = row.get(9);
                let event: Json =
                    serde_json::from_str(&event).map_err(|error| corrupt(error.to_string()))?;
                Ok(StoredLetter {
                    id,
                    pipeline: row.get(1),
                    lsn: lsn.parse().map_err(|_| corrupt(format!("lsn {lsn}")))?,
                    table: row.get(3),
                    operation: row.get(4),
                    key: key.and_then(|key| serde_json::from_str(&key).ok()),
                    error: row.get(6),
                    attempts: row.get(7),
                    failed_at: row.get(8),
                    event: event_from_json(&event).map_err(corrupt)?,
                })
            })
            .collect()
    }

    /// Removes the dead letters `ids` (replayed successfully).
    pub async fn remove(&self, ids: &[i64]) -> Result<u64, DeadLetterError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let client = self.client().await?;
        Ok(client
            .execute(
                "DELETE FROM pgstream_dead_letters WHERE id = ANY($1)",
                &[&ids],
            )
            .await?)
    }

    /// Notes a replay of `id` that failed again.
    pub async fn failed_again(&self, id: i64, error: &str) -> Result<(), DeadLetterError> {
        self.client()
            .await?
            .execute(
                "UPDATE pgstream_dead_letters
                 SET error = $2, attempts = attempts + 1, failed_at = now() WHERE id = $1",
                &[&id, &error],
            )
            .await?;
        Ok(())
    }

    /// Deletes the dead letters of `slot` (only `id` when given); returns how many.
    pub async fn purge(&self, slot: &str, id: Option<i64>) -> Result<u64, DeadLetterError> {
        let client = self.client().await?;
        if !table_exists(&client).await? {
            return Ok(0);
        }
        Ok(client
            .execute(
                "DELETE FROM pgstream_dead_letters
                 WHERE slot = $1 AND ($2::bigint IS NULL OR id = $2)",
                &[&slot, &id],
            )
            .await?)
    }
}

/// Whether the table exists yet (it is created by the first dead letter).
async fn table_exists(client: &tokio_postgres::Client) -> Result<bool, DeadLetterError> {
    Ok(client
        .query_one(
            "SELECT to_regclass('pgstream_dead_letters') IS NOT NULL",
            &[],
        )
        .await?
        .get(0))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// The WIT name of an operation.
pub fn operation_name(operation: Operation) -> &'static str {
    match operation {
        Operation::Insert => "insert",
        Operation::Update => "update",
        Operation::Delete => "delete",
        Operation::Truncate => "truncate",
        Operation::Read => "read",
    }
}

fn operation_named(name: &str) -> Option<Operation> {
    Some(match name {
        "insert" => Operation::Insert,
        "update" => Operation::Update,
        "delete" => Operation::Delete,
        "truncate" => Operation::Truncate,
        "read" => Operation::Read,
        _ => return None,
    })
}

/// The key column values of the event's row (or old row), when it has them all.
fn point_key(event: &ChangeEvent) -> Option<Json> {
    let relation = &event.relation;
    let row = if event.operation == Operation::Delete {
        event.old_row.as_deref().unwrap_or(&event.row)
    } else {
        &event.row
    };
    let values: Option<Vec<&str>> = relation
        .columns
        .iter()
        .zip(row)
        .filter(|(column, _)| column.is_key)
        .map(|(_, value)| value.as_str())
        .collect();
    values.filter(|values| !values.is_empty()).map(Json::from)
}

fn values_json(values: &[Value]) -> Json {
    values
        .iter()
        .map(|value| match value {
            Value::Null => json!({ "null": true }),
            Value::Unchanged => json!({ "unchanged": true }),
            Value::Text(text) => json!({ "text": &**text }),
        })
        .collect()
}

/// The event as stored: everything needed to rebuild it.
pub fn event_json(event: &ChangeEvent) -> Json {
    let relation = &event.relation;
    json!({
        "operation": operation_name(event.operation),
        "relation_id": relation.id,
        "schema": relation.schema,
        "table": relation.table,
        "columns": relation.columns.iter().map(|column| json!({
            "name": column.name,
            "type_oid": column.type_oid,
            "key": column.is_key,
        })).collect::<Vec<_>>(),
        "row": values_json(&event.row),
        "old_row": event.old_row.as_deref().map(values_json),
        "lsn": event.lsn.to_string(),
        "commit_time_us": event.commit_time_us,
        "xid": event.xid,
    })
}

fn values_from_json(values: &Json) -> Result<Vec<Value>, String> {
    let values = values.as_array().ok_or("a row is not a list")?;
    values
        .iter()
        .map(|value| {
            if let Some(text) = value.get("text").and_then(Json::as_str) {
                Value::text(Bytes::copy_from_slice(text.as_bytes())).map_err(|e| e.to_string())
            } else if value.get("unchanged").is_some() {
                Ok(Value::Unchanged)
            } else if value.get("null").is_some() {
                Ok(Value::Null)
            } else {
                Err(format!("unknown value {value}"))
            }
        })
        .collect()
}

/// Rebuilds an event stored by [`event_json`].
pub fn event_from_json(stored: &Json) -> Result<ChangeEvent, String> {
    let text = |field: &str| {
        stored
            .get(field)
            .and_then(Json::as_str)
            .ok_or_else(|| format!("no {field}"))
    };
    let number = |field: &str| {
        stored
            .get(field)
            .and_then(Json::as_i64)
            .ok_or_else(|| format!("no {field}"))
    };
    let operation = operation_named(text("operation")?).ok_or("unknown operation")?;
    let columns = stored
        .get("columns")
        .and_then(Json::as_array)
        .ok_or("no columns")?
        .iter()
        .map(|column| {
            Ok(Column {
                name: column
                    .get("name")
                    .and_then(Json::as_str)
                    .ok_or("a column without a name")?
                    .to_owned(),
                type_oid: column
                    .get("type_oid")
                    .and_then(Json::as_u64)
                    .and_then(|oid| u32::try_from(oid).ok())
                    .ok_or("a column without a type")?,
                is_key: column.get("key").and_then(Json::as_bool).unwrap_or(false),
            })
        })
        .collect::<Result<Vec<Column>, &str>>()?;
    let relation = Relation::new(
        u32::try_from(number("relation_id")?).map_err(|e| e.to_string())?,
        text("schema")?.to_owned(),
        text("table")?.to_owned(),
        columns,
    );
    let old_row = match stored.get("old_row") {
        None | Some(Json::Null) => None,
        Some(values) => Some(values_from_json(values)?),
    };
    Ok(ChangeEvent {
        operation,
        relation: Arc::new(relation),
        row: values_from_json(stored.get("row").ok_or("no row")?)?,
        old_row,
        lsn: text("lsn")?.parse().map_err(|_| "a bad lsn".to_owned())?,
        commit_time_us: number("commit_time_us")?,
        xid: u32::try_from(number("xid")?).map_err(|e| e.to_string())?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> ChangeEvent {
        let column = |name: &str, type_oid, is_key| Column {
            name: name.into(),
            type_oid,
            is_key,
        };
        let relation = Relation::new(
            16_384,
            "public".into(),
            "Docs \"quoted\"".into(),
            vec![
                column("id", 23, true),
                column("content", 25, false),
                column("note", 25, false),
            ],
        );
        ChangeEvent {
            operation: Operation::Update,
            relation: Arc::new(relation),
            row: vec![
                Value::text(Bytes::from_static(b"7")).unwrap(),
                Value::Unchanged,
                Value::Null,
            ],
            old_row: Some(vec![
                Value::text(Bytes::from_static(b"7")).unwrap(),
                Value::text(Bytes::from("caf\u{e9} \"x\"\n")).unwrap(),
                Value::Null,
            ]),
            lsn: Lsn(0x1_0000_00A0),
            commit_time_us: 1_700_000_000_123_456,
            xid: 4_000_000_000,
        }
    }

    #[test]
    fn a_stored_event_comes_back_as_it_was() {
        let original = event();
        let stored: Json = serde_json::from_str(&event_json(&original).to_string()).unwrap();
        let rebuilt = event_from_json(&stored).unwrap();
        assert_eq!(rebuilt.operation, original.operation);
        assert_eq!(rebuilt.relation.schema, original.relation.schema);
        assert_eq!(rebuilt.relation.table, original.relation.table);
        assert_eq!(rebuilt.relation.columns, original.relation.columns);
        assert_eq!(rebuilt.relation.key_columns, vec!["id".to_owned()]);
        assert_eq!(rebuilt.row, original.row);
        assert_eq!(rebuilt.old_row, original.old_row);
        assert_eq!(
            (rebuilt.lsn, rebuilt.commit_time_us, rebuilt.xid),
            (original.lsn, original.commit_time_us, original.xid)
        );
        assert_eq!(point_key(&original), Some(json!(["7"])));
    }

    #[test]
    fn a_damaged_event_is_refused_with_what_is_wrong() {
        let mut stored = event_json(&event());
        stored["operation"] = json!("upsert");
        assert_eq!(event_from_json(&stored).unwrap_err(), "unknown operation");
        let mut stored = event_json(&event());
        stored["row"] = json!([{ "bytes": "x" }]);
        assert!(
            event_from_json(&stored)
                .unwrap_err()
                .contains("unknown value")
        );
    }
}
