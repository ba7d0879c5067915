//! The backfill reader: one task per pipeline that reads requested tables chunk by chunk, by
//! key, between watermarks, and hands the rows to the [`BackfillMerge`](super::BackfillMerge)
//! on the stream side.
//!
//! For each chunk: tell the merge the chunk is starting, emit the low watermark, read the next
//! rows after the cursor with one short `COPY (SELECT ...)` in its own READ COMMITTED
//! transaction, hand them over, emit the high watermark, and wait until the pipeline confirmed
//! the high watermark's transaction. Only then does the cursor in `pgstream_backfills` move,
//! so a crash resumes at the last confirmed chunk, and nothing (no snapshot, no transaction)
//! is held between chunks. Chunks are read up to the largest key recorded when the backfill
//! started (rows inserted later arrive through the stream), so a busy table cannot make the
//! backfill endless. The chunk size follows the time a chunk takes to read.
//!
//! Between chunks the reader looks at the operator's requests (pause, resume, cancel) and at
//! the slot's hold on WAL: a pipeline busy with backfilled rows confirms live changes later,
//! and a slot must not be lost to a backfill, so the reader waits while the slot is near its
//! `max_slot_wal_keep_size` budget.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_postgres::Client;
use tracing::{debug, error, info, warn};

use super::copy_text::{CopyRows, CopyTextError};
use super::merge::{ChunkMessage, ChunkOutcome, ChunkRows, Mark, WATERMARK_PREFIX, Watermark};
use super::store::{self, BackfillState, BackfillStatus, StoreError};
use crate::event::{Column, Relation, Value};
use crate::replication::{self, ReplicationError, SourceConfig, TableName, quote_identifier};

/// Fewest and most rows a chunk reads.
pub const MIN_CHUNK_ROWS: usize = 1_000;
/// See [`MIN_CHUNK_ROWS`].
pub const MAX_CHUNK_ROWS: usize = 40_000;
/// The time a chunk's read should take; the size is adjusted toward it.
const TARGET_CHUNK_TIME: Duration = Duration::from_millis(500);
/// The time from a chunk's read to its confirmation (the pipeline handling its rows) that
/// the size is also kept under, so a pause or cancel takes effect within seconds and a
/// slow handler (an embedder) does not get chunks of minutes.
const TARGET_CHUNK_CYCLE: Duration = Duration::from_secs(3);
/// How often the reader looks for requested backfills while it has none.
const IDLE_POLL: Duration = Duration::from_secs(2);
/// How often a paused backfill, or one waiting for WAL room, looks again.
const WAIT_POLL: Duration = Duration::from_secs(1);
/// Share of the slot's WAL budget at which the reader warns, and at which it waits.
const WAL_WARN_SHARE: f64 = 0.5;
const WAL_WAIT_SHARE: f64 = 0.8;

/// Why a backfill cannot go on; stored in `last_error` and logged.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackfillError {
    /// The table has no key to page by.
    #[error(
        "table {table} has no primary key and no replica identity index, so it cannot be read \
         in chunks by key: add a primary key (or ALTER TABLE {quoted} REPLICA IDENTITY USING \
         INDEX on a unique index of NOT NULL columns)",
        quoted = table.quoted()
    )]
    NoKey {
        /// The table.
        table: TableName,
    },
    /// Watermarks need logical messages in the stream.
    #[error(
        "backfill needs Postgres 14 or later (pgoutput's `messages` option), and this server \
         is version {version}: upgrade, or start the pipeline with --backfill skip"
    )]
    ServerTooOld {
        /// `server_version_num`.
        version: i32,
    },
    /// The table is gone.
    #[error("table {table} does not exist any more")]
    TableMissing {
        /// The table.
        table: TableName,
    },
    /// A query failed.
    #[error("backfill query failed")]
    Sql(#[from] tokio_postgres::Error),
    /// Connecting failed.
    #[error(transparent)]
    Connect(#[from] ReplicationError),
    /// The state table could not be used.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The COPY data was malformed.
    #[error(transparent)]
    Copy(#[from] CopyTextError),
}

impl BackfillError {
    /// Whether trying again later may succeed (a lost connection), as opposed to a problem an
    /// operator must fix.
    fn is_transient(&self) -> bool {
        match self {
            BackfillError::Connect(error) => error.is_retryable(),
            BackfillError::Sql(error) | BackfillError::Store(StoreError::Sql(error)) => {
                error.is_closed() || error.as_db_error().is_none()
            }
            _ => false,
        }
    }
}

/// What the reader needs to know of its pipeline.
#[derive(Clone)]
pub struct ReaderSettings {
    /// The pipeline, for logs.
    pub pipeline: String,
    /// The source database.
    pub config: SourceConfig,
    /// The pipeline's slot: names its backfills and its watermarks.
    pub slot: String,
    /// Its publication, for column lists and row filters.
    pub publication: String,
    /// The tables it watches; requests for others are left alone.
    pub tables: Vec<TableName>,
    /// How often progress is logged.
    pub progress_interval: Duration,
}

/// The running reader; dropping it stops it (between two awaits: a chunk cut short is
/// read again by the next one, since its cursor never moved).
pub struct BackfillReader {
    task: JoinHandle<()>,
}

impl Drop for BackfillReader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl BackfillReader {
    /// Starts reading the requested backfills of `settings.slot`, sending chunks on `control`.
    pub fn start(settings: ReaderSettings, control: mpsc::UnboundedSender<ChunkMessage>) -> Self {
        BackfillReader {
            task: tokio::spawn(run(settings, control)),
        }
    }
}

async fn run(settings: ReaderSettings, control: mpsc::UnboundedSender<ChunkMessage>) {
    let mut reader = Reader {
        settings,
        control,
        next_chunk: rand_chunk_base(),
        chunk_rows: MIN_CHUNK_ROWS,
        client: None,
    };
    let mut backoff = Duration::from_secs(1);
    loop {
        match reader.step().await {
            Ok(true) => backoff = Duration::from_secs(1),
            Ok(false) => tokio::time::sleep(IDLE_POLL).await,
            Err(error) => {
                reader.client = None;
                warn!(
                    pipeline = %reader.settings.pipeline,
                    error = %crate::error_chain::one_line(&error),
                    "backfill reader failed; trying again in {}s",
                    backoff.as_secs()
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// A table as the backfill reads it.
struct TableShape {
    relation: Arc<Relation>,
    /// Key columns in index order: (column position in `relation`, SQL type for casts).
    keys: Vec<(usize, String)>,
    /// The publication's row filter (Postgres 15+), applied to the chunks too.
    row_filter: Option<String>,
}

struct Reader {
    settings: ReaderSettings,
    control: mpsc::UnboundedSender<ChunkMessage>,
    next_chunk: u64,
    chunk_rows: usize,
    client: Option<Client>,
}

impl Reader {
    async fn client(&mut self) -> Result<&Client, BackfillError> {
        if self.client.is_none() {
            let client = self.settings.config.connect_sql().await?;
            client
                .batch_execute("SET application_name = 'pgstream-host backfill'")
                .await?;
            store::ensure_table(&client).await?;
            self.client = Some(client);
        }
        Ok(self.client.as_ref().expect("just connected"))
    }

    /// Runs the next requested backfill to its end; `Ok(false)` when there is none.
    async fn step(&mut self) -> Result<bool, BackfillError> {
        let (slot, tables) = (self.settings.slot.clone(), self.settings.tables.clone());
        let Some(backfill) = store::next_active(self.client().await?, &slot, &tables).await? else {
            return Ok(false);
        };
        let table = backfill.table.clone();
        match self.backfill(backfill).await {
            Ok(()) => Ok(true),
            Err(error) if error.is_transient() => Err(error),
            Err(error) => {
                let message = crate::error_chain::one_line(&error);
                error!(pipeline = %self.settings.pipeline, table = %table, "backfill failed: {message}");
                store::fail(self.client().await?, &slot, &table, &message).await?;
                Ok(true)
            }
        }
    }

    async fn backfill(&mut self, mut backfill: BackfillStatus) -> Result<(), BackfillError> {
        let settings = self.settings.clone();
        let (pipeline, slot, table) = (&settings.pipeline, &settings.slot, &backfill.table);
        let version = super::require_watermarks(self.client().await?).await?;
        let shape = describe(self.client().await?, table, &settings.publication, version).await?;
        let filter = chunk_filter(
            backfill.where_clause.as_deref(),
            shape.row_filter.as_deref(),
        );
        if backfill.state == BackfillState::Pending {
            let client = self.client().await?;
            let max_key = max_key(client, table, &shape, &filter).await?;
            let Some(max_key) = max_key else {
                store::finish_empty(client, slot, table).await?;
                info!(pipeline = %pipeline, table = %table, "backfill done: the table has no rows to read");
                return Ok(());
            };
            let total =
                estimate_rows(client, table, &filter, backfill.where_clause.is_some()).await?;
            store::start(client, slot, table, Some(&max_key), total).await?;
            info!(
                pipeline = %pipeline, table = %table, rows_estimated = total.unwrap_or(-1),
                "backfill started"
            );
            backfill.max_key = Some(max_key);
            backfill.rows_total = total;
            backfill.cursor_key = None;
            backfill.rows_done = 0;
        } else {
            info!(
                pipeline = %pipeline, table = %table, rows_done = backfill.rows_done,
                "backfill resumed from its last confirmed chunk"
            );
        }
        // Each table starts small: its rows may be much larger or smaller than the last one's.
        self.chunk_rows = MIN_CHUNK_ROWS;
        let max_key = backfill.max_key.clone().unwrap_or_default();
        let mut cursor = backfill.cursor_key.clone();
        let mut rows_done = backfill.rows_done;
        let started = Instant::now();
        let done_at_start = rows_done;
        let mut last_progress = Instant::now();
        let mut wal_warned = false;
        loop {
            match self.wait_until_runnable(table).await? {
                Runnable::Go => {}
                Runnable::Stop(state) => {
                    info!(pipeline = %pipeline, table = %table, rows_done, "backfill {state}");
                    return Ok(());
                }
            }
            wal_warned = self.wait_for_wal_room(wal_warned).await?;

            let chunk = self.next_chunk;
            self.next_chunk = self.next_chunk.wrapping_add(1);
            let limit = self.chunk_rows;
            let read_started = Instant::now();
            let read = self
                .read_chunk(
                    chunk,
                    table,
                    &shape,
                    &filter,
                    cursor.as_deref(),
                    &max_key,
                    limit,
                )
                .await;
            let (rows, confirmed) = match read {
                Ok(read) => read,
                Err(error) => {
                    let _ = self.control.send(ChunkMessage::Abandon { chunk });
                    return Err(error);
                }
            };
            let read_time = read_started.elapsed();
            let cycle_started = Instant::now();
            let Some(rows) = rows else {
                // The table had nothing left in range: done with this chunk's confirmation.
                match confirmed.await {
                    Ok(_) => {
                        let client = self.client().await?;
                        store::advance(
                            client,
                            slot,
                            table,
                            cursor.as_deref().unwrap_or(&max_key),
                            0,
                            true,
                        )
                        .await?;
                        self.log_done(table, rows_done, started, done_at_start);
                        return Ok(());
                    }
                    Err(_) => continue,
                }
            };
            let (count, last_key) = rows;
            let finished = count < limit;
            match confirmed.await {
                Ok(ChunkOutcome { delivered }) => {
                    rows_done += count as i64;
                    debug!(pipeline = %pipeline, table = %table, chunk, rows = count, delivered, "backfill chunk confirmed");
                    let client = self.client().await?;
                    store::advance(client, slot, table, &last_key, count as i64, finished).await?;
                    cursor = Some(last_key);
                    self.chunk_rows = next_chunk_size(limit, read_time, cycle_started.elapsed());
                }
                Err(_) => {
                    // Not delivered (the stream restarted, or too much happened in the window):
                    // the same range again, smaller.
                    self.chunk_rows = (limit / 2).max(MIN_CHUNK_ROWS / 10);
                    continue;
                }
            }
            if finished {
                self.log_done(table, rows_done, started, done_at_start);
                return Ok(());
            }
            if last_progress.elapsed() >= settings.progress_interval {
                last_progress = Instant::now();
                let status = BackfillStatus {
                    rows_done,
                    rows_total: backfill.rows_total,
                    elapsed_secs: Some(started.elapsed().as_secs_f64()),
                    ..backfill.clone()
                };
                let rate =
                    (rows_done - done_at_start) as f64 / started.elapsed().as_secs_f64().max(1e-3);
                let eta = backfill.rows_total.map(|total| {
                    ((total - rows_done).max(0) as f64 / rate.max(1e-3)).round() as i64
                });
                info!(
                    pipeline = %pipeline, table = %table, rows_done,
                    rows_total = status.rows_total.unwrap_or(-1),
                    rows_per_sec = rate.round() as i64,
                    eta_secs = eta.unwrap_or(-1),
                    chunk_rows = self.chunk_rows,
                    "backfill progress"
                );
            }
        }
    }

    fn log_done(&self, table: &TableName, rows_done: i64, started: Instant, done_at_start: i64) {
        let secs = started.elapsed().as_secs_f64();
        info!(
            pipeline = %self.settings.pipeline, table = %table, rows_done,
            secs = (secs * 1000.0).round() / 1000.0,
            rows_per_sec = ((rows_done - done_at_start) as f64 / secs.max(1e-3)).round() as i64,
            "backfill done"
        );
    }

    /// Reads one chunk between its watermarks. Returns the row count and last key (`None`
    /// when no row was left), and where the confirmation of its delivery will come.
    #[allow(clippy::too_many_arguments)]
    async fn read_chunk(
        &mut self,
        chunk: u64,
        table: &TableName,
        shape: &TableShape,
        filter: &str,
        cursor: Option<&[String]>,
        max_key: &[String],
        limit: usize,
    ) -> Result<
        (
            Option<(usize, Vec<String>)>,
            oneshot::Receiver<ChunkOutcome>,
        ),
        BackfillError,
    > {
        let slot = self.settings.slot.clone();
        let control = self.control.clone();
        let _ = control.send(ChunkMessage::Begin { chunk });
        let client = self.client().await?;
        emit_watermark(client, &slot, chunk, Mark::Low).await?;
        let sql = chunk_sql(table, shape, filter, cursor, max_key, limit);
        let rows = copy_rows(client, &sql, shape.relation.columns.len()).await?;
        let summary = rows.last().map(|row| {
            let key = shape
                .keys
                .iter()
                .map(|(position, _)| row[*position].as_str().unwrap_or_default().to_owned())
                .collect();
            (rows.len(), key)
        });
        if let Some(delay) = window_delay() {
            tokio::time::sleep(delay).await;
        }
        let (confirmed, receiver) = oneshot::channel();
        let _ = control.send(ChunkMessage::Rows {
            chunk,
            rows: ChunkRows {
                relation: shape.relation.clone(),
                rows,
                confirmed,
            },
        });
        emit_watermark(client, &slot, chunk, Mark::High).await?;
        Ok((summary, receiver))
    }

    async fn wait_until_runnable(&mut self, table: &TableName) -> Result<Runnable, BackfillError> {
        let slot = self.settings.slot.clone();
        let mut said_paused = false;
        loop {
            let state = store::status(self.client().await?, &slot, table)
                .await?
                .map(|status| status.state);
            match state {
                Some(BackfillState::Running) => return Ok(Runnable::Go),
                Some(BackfillState::Paused) => {
                    if !said_paused {
                        info!(pipeline = %self.settings.pipeline, table = %table, "backfill paused; `backfill --resume` continues it");
                        said_paused = true;
                    }
                    tokio::time::sleep(WAIT_POLL).await;
                }
                Some(other) => return Ok(Runnable::Stop(other)),
                None => return Ok(Runnable::Stop(BackfillState::Cancelled)),
            }
        }
    }

    /// Waits while the slot holds most of its WAL budget; returns whether the half-budget
    /// warning was given.
    async fn wait_for_wal_room(&mut self, mut warned: bool) -> Result<bool, BackfillError> {
        let slot = self.settings.slot.clone();
        let mut waiting = false;
        loop {
            let wal = replication::slot_wal(self.client().await?, &slot).await?;
            let share = wal.as_ref().and_then(budget_share);
            let unreserved = wal
                .as_ref()
                .is_some_and(|wal| wal.wal_status.as_deref() == Some("unreserved"));
            if unreserved || share.is_some_and(|share| share >= WAL_WAIT_SHARE) {
                if !waiting {
                    warn!(
                        pipeline = %self.settings.pipeline, slot = %slot,
                        "backfill waiting: the slot holds {:.0}% of the WAL max_slot_wal_keep_size \
                         lets it keep; it goes on once the pipeline has confirmed enough",
                        share.unwrap_or(1.0) * 100.0
                    );
                    waiting = true;
                }
                tokio::time::sleep(WAIT_POLL).await;
                continue;
            }
            if !warned && share.is_some_and(|share| share >= WAL_WARN_SHARE) {
                warn!(
                    pipeline = %self.settings.pipeline, slot = %slot,
                    "backfill: the slot holds over half of the WAL max_slot_wal_keep_size lets it \
                     keep; the backfill waits before it gets near the limit"
                );
                warned = true;
            }
            if waiting {
                info!(pipeline = %self.settings.pipeline, slot = %slot, "backfill going on: the slot has WAL room again");
            }
            return Ok(warned);
        }
    }
}

enum Runnable {
    Go,
    Stop(BackfillState),
}

/// Checks that `table` can be backfilled (it exists and has a key to page by), so a request
/// is refused at once rather than failing in the pipeline later.
pub async fn check_backfillable(
    client: &Client,
    table: &TableName,
    publication: &str,
) -> Result<(), BackfillError> {
    let version = super::require_watermarks(client).await?;
    describe(client, table, publication, version)
        .await
        .map(|_| ())
}

/// Test hook: `PGSTREAM_BACKFILL_WINDOW_DELAY_MS` holds each chunk's window open that long
/// after its rows were read, so an end-to-end test can commit a change inside the window.
fn window_delay() -> Option<Duration> {
    std::env::var("PGSTREAM_BACKFILL_WINDOW_DELAY_MS")
        .ok()?
        .parse()
        .ok()
        .map(Duration::from_millis)
}

/// Retained WAL as a share of what the slot may retain, when that is limited.
fn budget_share(wal: &replication::SlotWal) -> Option<f64> {
    let (retained, safe) = (wal.retained_bytes?, wal.safe_wal_size?);
    let budget = (retained + safe.max(0)) as f64;
    (budget > 0.0).then(|| retained as f64 / budget)
}

/// A starting chunk number unlikely to match a watermark of an earlier session of the same
/// slot still in the WAL.
fn rand_chunk_base() -> u64 {
    fastrand::u64(..) >> 8
}

/// The next chunk's size after one of `size` rows took `read` to read and `cycle` more to be
/// handled and confirmed: toward both targets, by at most a factor of two either way.
fn next_chunk_size(size: usize, read: Duration, cycle: Duration) -> usize {
    let scale = |target: Duration, took: Duration| {
        size as f64 * target.as_secs_f64() / took.as_secs_f64().max(1e-3)
    };
    let scaled = scale(TARGET_CHUNK_TIME, read).min(scale(TARGET_CHUNK_CYCLE, cycle)) as usize;
    scaled
        .clamp(size / 2, size * 2)
        .clamp(MIN_CHUNK_ROWS, MAX_CHUNK_ROWS)
}

async fn emit_watermark(
    client: &Client,
    slot: &str,
    chunk: u64,
    mark: Mark,
) -> Result<(), BackfillError> {
    let content = serde_json::to_string(&Watermark {
        slot: slot.to_owned(),
        chunk,
        mark,
    })
    .expect("a watermark serializes");
    client
        .execute(
            "SELECT pg_logical_emit_message(true, $1, $2)",
            &[&WATERMARK_PREFIX, &content],
        )
        .await?;
    Ok(())
}

async fn copy_rows(
    client: &Client,
    sql: &str,
    columns: usize,
) -> Result<Vec<Vec<Value>>, BackfillError> {
    let stream = client.copy_out(sql).await?;
    futures::pin_mut!(stream);
    let mut rows = CopyRows::new(columns);
    while let Some(piece) = stream.next().await {
        rows.push(piece?)?;
    }
    Ok(rows.finish()?)
}

/// Columns (published ones, in table order), key columns and row filter of `table`.
async fn describe(
    client: &Client,
    table: &TableName,
    publication: &str,
    version: i32,
) -> Result<TableShape, BackfillError> {
    let oid: Option<u32> = client
        .query_one("SELECT to_regclass($1)::oid", &[&table.quoted()])
        .await?
        .get(0);
    let Some(oid) = oid else {
        return Err(BackfillError::TableMissing {
            table: table.clone(),
        });
    };
    // Postgres 15 added column lists and row filters to publications.
    let (published, row_filter): (Option<Vec<String>>, Option<String>) = if version >= 150_000 {
        match client
            .query_opt(
                "SELECT attnames::text[], rowfilter FROM pg_publication_tables
                 WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
                &[&publication, &table.schema, &table.name],
            )
            .await?
        {
            Some(row) => (row.get(0), row.get(1)),
            None => (None, None),
        }
    } else {
        (None, None)
    };
    let columns = client
        .query(
            "SELECT attname::text, atttypid, attnum FROM pg_attribute
             WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped AND attgenerated = ''
             ORDER BY attnum",
            &[&oid],
        )
        .await?;
    let key_rows = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod)
             FROM (SELECT indrelid, indkey, indisprimary FROM pg_index
                   WHERE indrelid = $1 AND (indisprimary OR indisreplident)
                   ORDER BY indisprimary DESC LIMIT 1) i,
                  unnest(i.indkey) WITH ORDINALITY AS k(attnum, position)
             JOIN pg_attribute a ON a.attrelid = $1 AND a.attnum = k.attnum
             ORDER BY k.position",
            &[&oid],
        )
        .await?;
    if key_rows.is_empty() {
        return Err(BackfillError::NoKey {
            table: table.clone(),
        });
    }
    let key_names: Vec<String> = key_rows.iter().map(|row| row.get(0)).collect();
    let columns: Vec<Column> = columns
        .iter()
        .map(|row| (row.get::<_, String>(0), row.get::<_, u32>(1)))
        .filter(|(name, _)| {
            published
                .as_ref()
                .is_none_or(|published| published.contains(name))
                || key_names.contains(name)
        })
        .map(|(name, type_oid)| Column {
            is_key: key_names.contains(&name),
            name,
            type_oid,
        })
        .collect();
    let keys = key_rows
        .iter()
        .map(|row| {
            let name: String = row.get(0);
            let position = columns
                .iter()
                .position(|column| column.name == name)
                .expect("key columns are among the columns");
            (position, row.get::<_, String>(1))
        })
        .collect();
    let relation = Relation::new(oid, table.schema.clone(), table.name.clone(), columns);
    Ok(TableShape {
        relation: Arc::new(relation),
        keys,
        row_filter,
    })
}

/// ` AND (where) AND (row filter)`, or nothing.
fn chunk_filter(where_clause: Option<&str>, row_filter: Option<&str>) -> String {
    let mut filter = String::new();
    for condition in [where_clause, row_filter].into_iter().flatten() {
        filter.push_str(" AND (");
        filter.push_str(condition);
        filter.push(')');
    }
    filter
}

/// `E'text'`: a string literal for any text.
fn literal(text: &str) -> String {
    format!("E'{}'", text.replace('\\', "\\\\").replace('\'', "''"))
}

/// The key columns' quoted names, in index order.
fn key_names(table: &TableShape) -> Vec<String> {
    table
        .keys
        .iter()
        .map(|(position, _)| quote_identifier(&table.relation.columns[*position].name))
        .collect()
}

fn key_list(table: &TableShape) -> String {
    format!("({})", key_names(table).join(", "))
}

fn key_values(table: &TableShape, key: &[String]) -> String {
    let values: Vec<String> = table
        .keys
        .iter()
        .zip(key)
        .map(|((_, sql_type), value)| format!("{}::{sql_type}", literal(value)))
        .collect();
    format!("({})", values.join(", "))
}

fn chunk_sql(
    table: &TableName,
    shape: &TableShape,
    filter: &str,
    cursor: Option<&[String]>,
    max_key: &[String],
    limit: usize,
) -> String {
    let columns: Vec<String> = shape
        .relation
        .columns
        .iter()
        .map(|column| quote_identifier(&column.name))
        .collect();
    let keys = key_list(shape);
    let after = cursor
        .map(|cursor| format!(" AND {keys} > {}", key_values(shape, cursor)))
        .unwrap_or_default();
    format!(
        "COPY (SELECT {} FROM {} WHERE {keys} <= {}{after}{filter} ORDER BY {} LIMIT {limit}) TO STDOUT",
        columns.join(", "),
        table.quoted(),
        key_values(shape, max_key),
        key_names(shape).join(", "),
    )
}

async fn max_key(
    client: &Client,
    table: &TableName,
    shape: &TableShape,
    filter: &str,
) -> Result<Option<Vec<String>>, BackfillError> {
    let key_columns = key_names(shape);
    let order: Vec<String> = key_columns
        .iter()
        .map(|name| format!("{name} DESC"))
        .collect();
    let sql = format!(
        "COPY (SELECT {} FROM {} WHERE true{filter} ORDER BY {} LIMIT 1) TO STDOUT",
        key_columns.join(", "),
        table.quoted(),
        order.join(", "),
    );
    let rows = copy_rows(client, &sql, shape.keys.len()).await?;
    Ok(rows.first().map(|row| {
        row.iter()
            .map(|value| value.as_str().unwrap_or_default().to_owned())
            .collect()
    }))
}

async fn estimate_rows(
    client: &Client,
    table: &TableName,
    filter: &str,
    filtered: bool,
) -> Result<Option<i64>, BackfillError> {
    if !filtered {
        let estimate: Option<i64> = client
            .query_one(
                "SELECT reltuples::int8 FROM pg_class WHERE oid = to_regclass($1)",
                &[&table.quoted()],
            )
            .await?
            .get(0);
        if let Some(estimate) = estimate.filter(|estimate| *estimate >= 0) {
            return Ok(Some(estimate));
        }
    }
    // Never analyzed, or filtered: count (one statement, no transaction kept open after it).
    let sql = format!("SELECT count(*) FROM {} WHERE true{filter}", table.quoted());
    Ok(Some(client.query_one(&sql, &[]).await?.get(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_survive_quotes_and_backslashes() {
        assert_eq!(literal(r"it's a \ test"), r"E'it''s a \\ test'");
    }

    #[test]
    fn chunk_size_moves_toward_the_target_time_within_bounds() {
        let quick = Duration::from_millis(10);
        assert_eq!(
            next_chunk_size(1_000, Duration::from_millis(100), quick),
            2_000
        );
        assert_eq!(
            next_chunk_size(10_000, Duration::from_secs(2), quick),
            5_000
        );
        assert_eq!(next_chunk_size(40_000, quick, quick), MAX_CHUNK_ROWS);
        assert_eq!(
            next_chunk_size(1_000, Duration::from_secs(5), quick),
            MIN_CHUNK_ROWS
        );
        // A slow handler keeps chunks to what it gets through in a few seconds.
        assert_eq!(next_chunk_size(8_000, quick, Duration::from_secs(6)), 4_000);
        assert_eq!(next_chunk_size(8_000, quick, Duration::from_secs(3)), 8_000);
    }

    #[test]
    fn filters_are_anded() {
        assert_eq!(chunk_filter(None, None), "");
        assert_eq!(
            chunk_filter(Some("a > 1"), Some("b")),
            " AND (a > 1) AND (b)"
        );
    }
}
