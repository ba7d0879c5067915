//! The backfill state of every table, kept in the source database (`pgstream_backfills`), so a
//! restarted host, or another host taking the pipeline over, resumes where the last one
//! confirmed, and so the `backfill` command can request, pause, resume or cancel a backfill
//! of a pipeline that runs elsewhere.
//!
//! One row per (slot, table). Its `cursor_key` is the key of the last row whose chunk the
//! pipeline confirmed: it only moves after the high watermark's position was confirmed, so it
//! never claims more than the sink has. Keys are kept as the text Postgres prints for them
//! (the same text `pgoutput` sends) and turned back into values with a cast to the key
//! column's type, so keyset pagination compares them in the type's own order.

use std::fmt;
use std::str::FromStr;

use tokio_postgres::Client;

use crate::replication::TableName;

/// The table the state is kept in, found through the role's `search_path`.
pub const BACKFILL_TABLE: &str = "pgstream_backfills";

/// What a backfill is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackfillState {
    /// Requested; the pipeline starts it when it gets to it.
    Pending,
    /// Being read, chunk by chunk.
    Running,
    /// Stopped by an operator between two chunks; `resume` continues from the cursor.
    Paused,
    /// Stopped by an operator for good; the rows read so far stay delivered.
    Cancelled,
    /// Every row up to the key recorded at the start was delivered and confirmed.
    Done,
    /// Stopped by an error an operator must fix (the message is in `last_error`).
    Failed,
}

impl BackfillState {
    /// The name stored in the table and printed by `backfill --status`.
    pub fn as_str(self) -> &'static str {
        match self {
            BackfillState::Pending => "pending",
            BackfillState::Running => "running",
            BackfillState::Paused => "paused",
            BackfillState::Cancelled => "cancelled",
            BackfillState::Done => "done",
            BackfillState::Failed => "failed",
        }
    }

    /// Whether the backfill still has rows to deliver (it may be paused).
    pub fn is_active(self) -> bool {
        matches!(
            self,
            BackfillState::Pending | BackfillState::Running | BackfillState::Paused
        )
    }
}

impl fmt::Display for BackfillState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BackfillState {
    type Err = StoreError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(match text {
            "pending" => BackfillState::Pending,
            "running" => BackfillState::Running,
            "paused" => BackfillState::Paused,
            "cancelled" => BackfillState::Cancelled,
            "done" => BackfillState::Done,
            "failed" => BackfillState::Failed,
            other => return Err(StoreError::UnknownState(other.to_owned())),
        })
    }
}

/// Why reading or writing the backfill state failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The query failed.
    #[error("reading or writing {BACKFILL_TABLE} failed")]
    Sql(#[from] tokio_postgres::Error),
    /// A state this version does not know (written by a newer host).
    #[error("{BACKFILL_TABLE} holds an unknown state {0:?}; is a newer pgstream-host writing it?")]
    UnknownState(String),
    /// A backfill of the table is still active, so another cannot be requested.
    #[error(
        "a backfill of {table} is already {state} ({done} rows done): wait for it, or run \
         `pgstream-host backfill --cancel --table {table}` first"
    )]
    AlreadyActive {
        /// The table.
        table: TableName,
        /// Its state.
        state: BackfillState,
        /// Rows confirmed so far.
        done: i64,
    },
}

/// One table's backfill, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct BackfillStatus {
    /// The table.
    pub table: TableName,
    /// What it is doing.
    pub state: BackfillState,
    /// The operator's row filter, if any (SQL).
    pub where_clause: Option<String>,
    /// Key of the last confirmed row (as text, key column order); `None` before the first chunk.
    pub cursor_key: Option<Vec<String>>,
    /// The largest key when the backfill started: rows above it arrive through the stream.
    pub max_key: Option<Vec<String>>,
    /// Rows delivered and confirmed.
    pub rows_done: i64,
    /// Estimated rows in total (`pg_class.reltuples`, or a count when filtered).
    pub rows_total: Option<i64>,
    /// Seconds the backfill has been running (from its start to its last update).
    pub elapsed_secs: Option<f64>,
    /// Why it failed.
    pub last_error: Option<String>,
}

impl BackfillStatus {
    /// Confirmed rows per second so far.
    pub fn rows_per_sec(&self) -> Option<f64> {
        self.elapsed_secs
            .filter(|secs| *secs > 0.0)
            .map(|secs| self.rows_done as f64 / secs)
    }

    /// Seconds left at the rate so far, when a total is known.
    pub fn eta_secs(&self) -> Option<f64> {
        let rate = self.rows_per_sec().filter(|rate| *rate > 0.0)?;
        let left = (self.rows_total? - self.rows_done).max(0);
        Some(left as f64 / rate)
    }
}

/// Creates the state table when missing. Needs the CREATE privilege on the first schema of
/// the role's `search_path` the first time.
pub async fn ensure_table(client: &Client) -> Result<(), StoreError> {
    client
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {BACKFILL_TABLE} (
             slot text NOT NULL,
             schema_name text NOT NULL,
             table_name text NOT NULL,
             state text NOT NULL,
             where_clause text,
             cursor_key text[],
             max_key text[],
             rows_done bigint NOT NULL DEFAULT 0,
             rows_total bigint,
             requested_at timestamptz NOT NULL DEFAULT now(),
             started_at timestamptz,
             updated_at timestamptz NOT NULL DEFAULT now(),
             last_error text,
             PRIMARY KEY (slot, schema_name, table_name))"
        ))
        .await?;
    Ok(())
}

/// Requests a backfill of `table` for `slot`, replacing a finished, cancelled or failed one.
/// Refused while one is active (`replace_active` false); with `replace_active` true an active
/// one restarts from the beginning (used when a new slot is made, whose stream begins now).
pub async fn request(
    client: &Client,
    slot: &str,
    table: &TableName,
    where_clause: Option<&str>,
    replace_active: bool,
) -> Result<(), StoreError> {
    ensure_table(client).await?;
    if !replace_active
        && let Some(existing) = status(client, slot, table).await?
        && existing.state.is_active()
    {
        return Err(StoreError::AlreadyActive {
            table: table.clone(),
            state: existing.state,
            done: existing.rows_done,
        });
    }
    client
        .execute(
            &format!(
                "INSERT INTO {BACKFILL_TABLE} (slot, schema_name, table_name, state, where_clause)
                 VALUES ($1, $2, $3, 'pending', $4)
                 ON CONFLICT (slot, schema_name, table_name) DO UPDATE SET
                   state = 'pending', where_clause = $4, cursor_key = NULL, max_key = NULL,
                   rows_done = 0, rows_total = NULL, requested_at = now(), started_at = NULL,
                   updated_at = now(), last_error = NULL"
            ),
            &[&slot, &table.schema, &table.name, &where_clause],
        )
        .await?;
    Ok(())
}

/// Moves the backfills of `slot` (of `table` only, when given) that are in one of `from` to
/// `to`; returns the tables changed.
pub async fn transition(
    client: &Client,
    slot: &str,
    table: Option<&TableName>,
    from: &[BackfillState],
    to: BackfillState,
) -> Result<Vec<TableName>, StoreError> {
    ensure_table(client).await?;
    let from: Vec<&str> = from.iter().map(|state| state.as_str()).collect();
    let (schema, name) = match table {
        Some(table) => (Some(table.schema.as_str()), Some(table.name.as_str())),
        None => (None, None),
    };
    let rows = client
        .query(
            &format!(
                "UPDATE {BACKFILL_TABLE} SET state = $1, updated_at = now()
                 WHERE slot = $2 AND state = ANY ($3)
                   AND ($4::text IS NULL OR (schema_name = $4 AND table_name = $5))
                 RETURNING schema_name, table_name"
            ),
            &[&to.as_str(), &slot, &from, &schema, &name],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| TableName {
            schema: row.get(0),
            name: row.get(1),
        })
        .collect())
}

/// Every backfill of `slot`, oldest request first.
pub async fn list(client: &Client, slot: &str) -> Result<Vec<BackfillStatus>, StoreError> {
    if !table_exists(client).await? {
        return Ok(Vec::new());
    }
    let rows = client.query(&select_sql("slot = $1"), &[&slot]).await?;
    rows.iter().map(status_of_row).collect()
}

/// One table's backfill of `slot`.
pub async fn status(
    client: &Client,
    slot: &str,
    table: &TableName,
) -> Result<Option<BackfillStatus>, StoreError> {
    let row = client
        .query_opt(
            &select_sql("slot = $1 AND schema_name = $2 AND table_name = $3"),
            &[&slot, &table.schema, &table.name],
        )
        .await?;
    row.as_ref().map(status_of_row).transpose()
}

/// The oldest backfill of `slot` among `tables` that still has work (running first, so a
/// restart resumes what it was doing before starting another).
pub async fn next_active(
    client: &Client,
    slot: &str,
    tables: &[TableName],
) -> Result<Option<BackfillStatus>, StoreError> {
    let all = list(client, slot).await?;
    let wanted = |status: &&BackfillStatus| {
        tables.contains(&status.table)
            && matches!(
                status.state,
                BackfillState::Running | BackfillState::Pending
            )
    };
    let mut candidates: Vec<&BackfillStatus> = all.iter().filter(wanted).collect();
    candidates.sort_by_key(|status| status.state != BackfillState::Running);
    Ok(candidates.first().map(|status| (*status).clone()))
}

/// Marks a pending backfill running, with the key range and the estimated total it covers.
pub async fn start(
    client: &Client,
    slot: &str,
    table: &TableName,
    max_key: Option<&[String]>,
    rows_total: Option<i64>,
) -> Result<(), StoreError> {
    client
        .execute(
            &format!(
                "UPDATE {BACKFILL_TABLE} SET state = 'running', max_key = $4, rows_total = $5,
                   cursor_key = NULL, rows_done = 0, started_at = now(), updated_at = now()
                 WHERE slot = $1 AND schema_name = $2 AND table_name = $3 AND state = 'pending'"
            ),
            &[&slot, &table.schema, &table.name, &max_key, &rows_total],
        )
        .await?;
    Ok(())
}

/// Records a confirmed chunk: the cursor moves to `cursor_key` and `rows` more are done;
/// `finished` marks the backfill done. A backfill an operator paused or cancelled meanwhile
/// keeps that state, with its progress recorded.
pub async fn advance(
    client: &Client,
    slot: &str,
    table: &TableName,
    cursor_key: &[String],
    rows: i64,
    finished: bool,
) -> Result<(), StoreError> {
    client
        .execute(
            &format!(
                "UPDATE {BACKFILL_TABLE} SET cursor_key = $4, rows_done = rows_done + $5,
                   state = CASE WHEN $6 AND state IN ('running', 'paused', 'cancelled')
                                THEN 'done' ELSE state END,
                   updated_at = now()
                 WHERE slot = $1 AND schema_name = $2 AND table_name = $3"
            ),
            &[
                &slot,
                &table.schema,
                &table.name,
                &cursor_key,
                &rows,
                &finished,
            ],
        )
        .await?;
    Ok(())
}

/// Marks a backfill done without a chunk (the table had no rows to read).
pub async fn finish_empty(
    client: &Client,
    slot: &str,
    table: &TableName,
) -> Result<(), StoreError> {
    client
        .execute(
            &format!(
                "UPDATE {BACKFILL_TABLE} SET state = 'done', updated_at = now()
                 WHERE slot = $1 AND schema_name = $2 AND table_name = $3"
            ),
            &[&slot, &table.schema, &table.name],
        )
        .await?;
    Ok(())
}

/// Marks a backfill failed with the reason.
pub async fn fail(
    client: &Client,
    slot: &str,
    table: &TableName,
    error: &str,
) -> Result<(), StoreError> {
    client
        .execute(
            &format!(
                "UPDATE {BACKFILL_TABLE} SET state = 'failed', last_error = $4, updated_at = now()
                 WHERE slot = $1 AND schema_name = $2 AND table_name = $3"
            ),
            &[&slot, &table.schema, &table.name, &error],
        )
        .await?;
    Ok(())
}

/// Forgets every backfill of `slot` (its slot was dropped).
pub async fn forget_slot(client: &Client, slot: &str) -> Result<u64, StoreError> {
    if !table_exists(client).await? {
        return Ok(0);
    }
    Ok(client
        .execute(
            &format!("DELETE FROM {BACKFILL_TABLE} WHERE slot = $1"),
            &[&slot],
        )
        .await?)
}

async fn table_exists(client: &Client) -> Result<bool, StoreError> {
    Ok(client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&BACKFILL_TABLE])
        .await?
        .get(0))
}

fn select_sql(filter: &str) -> String {
    format!(
        "SELECT schema_name, table_name, state, where_clause, cursor_key, max_key, rows_done,
           rows_total, extract(epoch FROM updated_at - started_at)::float8, last_error
         FROM {BACKFILL_TABLE} WHERE {filter} ORDER BY requested_at, schema_name, table_name"
    )
}

fn status_of_row(row: &tokio_postgres::Row) -> Result<BackfillStatus, StoreError> {
    Ok(BackfillStatus {
        table: TableName {
            schema: row.get(0),
            name: row.get(1),
        },
        state: row.get::<_, String>(2).parse()?,
        where_clause: row.get(3),
        cursor_key: row.get(4),
        max_key: row.get(5),
        rows_done: row.get(6),
        rows_total: row.get(7),
        elapsed_secs: row.get(8),
        last_error: row.get(9),
    })
}
