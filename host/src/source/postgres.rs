//! [`PostgresSource`]: a logical replication slot streamed with `pgoutput`, as a
//! [`ChangeSource`].
//!
//! `prepare` runs the preflight checks, creates the publication and slot when missing and
//! reads the watched tables' primary keys; each `start` opens a new replication session from
//! the given position; `recv` turns each chunk the socket delivered into items with
//! [`WalEvents`], then through the [`BackfillMerge`], which adds the rows the backfill
//! reader reads (see [`backfill`](super::backfill)).

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use tracing::{info, warn};

use super::backfill::{self, BackfillMerge, BackfillReader, ReaderSettings};
use super::slot_guard::SlotGuard;
use super::{ChangeSource, SourceError, SourceItem, WalEvents};
use crate::lsn::Lsn;
use crate::pipeline::StatusHandle;
use crate::replication::{
    self, ReplicationError, ReplicationStream, SourceConfig, StreamOptions, TableName, WalMessage,
};

/// One pipeline's replication slot and publication on one database.
pub struct PostgresSource {
    /// The pipeline this source feeds, for logs.
    pipeline: String,
    config: SourceConfig,
    tables: Vec<TableName>,
    slot: String,
    publication: String,
    options: StreamOptions,
    events: WalEvents,
    stream: Option<ReplicationStream>,
    /// Watches the slot's hold on WAL while streaming.
    guard: Option<SlotGuard>,
    /// Where the guard's readings go.
    status: Option<StatusHandle>,
    backfill: BackfillSettings,
    /// Whether the server can send logical messages (Postgres 14+), which backfill needs.
    messages_supported: bool,
    merge: BackfillMerge,
    /// The reader's end of the merge's channel, until the reader starts.
    control: Option<tokio::sync::mpsc::UnboundedSender<backfill::ChunkMessage>>,
    reader: Option<BackfillReader>,
}

/// How a [`PostgresSource`] backfills.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackfillSettings {
    /// The tables a first start (a new slot) backfills, when they have rows.
    pub initial: Vec<TableName>,
    /// How often a running backfill logs its progress.
    pub progress_interval: Duration,
}

impl Default for BackfillSettings {
    fn default() -> Self {
        BackfillSettings {
            initial: Vec::new(),
            progress_interval: Duration::from_secs(5),
        }
    }
}

impl PostgresSource {
    /// A source for `tables`, through `slot` and `publication`. Nothing is touched until
    /// [`ChangeSource::prepare`].
    pub fn new(
        pipeline: &str,
        config: SourceConfig,
        tables: Vec<TableName>,
        slot: &str,
        publication: &str,
        options: StreamOptions,
    ) -> PostgresSource {
        let (control, receiver) = tokio::sync::mpsc::unbounded_channel();
        PostgresSource {
            backfill: BackfillSettings::default(),
            messages_supported: false,
            merge: BackfillMerge::new(slot, receiver),
            control: Some(control),
            reader: None,
            pipeline: pipeline.to_owned(),
            config,
            tables,
            slot: slot.to_owned(),
            publication: publication.to_owned(),
            options,
            events: WalEvents::new(HashMap::new()),
            stream: None,
            guard: None,
            status: None,
        }
    }

    /// Sets how the source backfills (by default: no initial backfill, progress every 5 s).
    pub fn with_backfill(mut self, backfill: BackfillSettings) -> PostgresSource {
        self.backfill = backfill;
        self
    }
}

#[async_trait]
impl ChangeSource for PostgresSource {
    fn describe(&self) -> String {
        format!("slot {} on {}", self.slot, self.config.display())
    }

    async fn prepare(&mut self) -> Result<Lsn, SourceError> {
        let client = self.config.connect_sql().await?;
        replication::preflight(&client, &self.tables).await?;
        let version = backfill::server_version(&client)
            .await
            .map_err(ReplicationError::Sql)?;
        self.messages_supported = version >= backfill::MIN_SERVER_VERSION;
        // The initial backfill is recorded before the slot is made, so a crash in between
        // cannot leave a new slot whose older rows nobody reads.
        let slot_exists = replication::slot_wal(&client, &self.slot).await?.is_some();
        let backfilled = if !slot_exists {
            backfill::register_initial(&client, &self.slot, &self.backfill.initial)
                .await
                .map_err(|(table, source)| SourceError::Backfill { table, source })?
        } else {
            Vec::new()
        };
        let report =
            replication::setup(&client, &self.slot, &self.publication, &self.tables).await?;
        if report.slot_created {
            info!(pipeline = %self.pipeline, slot = %self.slot, "created replication slot");
        }
        for table in &report.tables_with_rows {
            if backfilled.contains(table) {
                info!(
                    pipeline = %self.pipeline,
                    "table {table} already has rows; they are backfilled, then live changes follow"
                );
            } else {
                warn!(
                    pipeline = %self.pipeline,
                    "table {table} already has rows; with --backfill skip only changes from now \
                     on are delivered (run `pgstream-host backfill --table {table}` to deliver \
                     the others)"
                );
            }
        }
        let primary_keys = primary_keys(&client, &self.tables).await?;
        self.events = WalEvents::new(primary_keys);
        // An invalidated slot cannot stream, and replacing it would skip changes silently.
        // (A slot merely at risk is reported by the guard, whose first reading comes as soon
        // as the stream starts.)
        if let Some(wal) = replication::slot_wal(&client, &self.slot).await?
            && wal.is_lost()
        {
            return Err(SourceError::SlotLost {
                slot: self.slot.clone(),
            });
        }
        let confirmed = replication::slot_confirmed_flush_lsn(&client, &self.slot)
            .await?
            .unwrap_or(Lsn::ZERO);
        Ok(confirmed)
    }

    async fn start(&mut self, from: Lsn) -> Result<(), SourceError> {
        // A session that ended badly is dropped without ceremony; the new one replays.
        self.stream = None;
        self.events.reset();
        self.merge.reset();
        let options = StreamOptions {
            messages: self.messages_supported,
            ..self.options.clone()
        };
        let started =
            ReplicationStream::start(&self.config, &self.slot, &self.publication, from, options)
                .await;
        let stream = match started {
            Ok(stream) => stream,
            Err(error) if !error.is_retryable() && self.slot_is_lost().await => {
                return Err(SourceError::SlotLost {
                    slot: self.slot.clone(),
                });
            }
            Err(error) => return Err(error.into()),
        };
        self.stream = Some(stream);
        if let Some(control) = self.control.take() {
            let settings = ReaderSettings {
                pipeline: self.pipeline.clone(),
                config: self.config.clone(),
                slot: self.slot.clone(),
                publication: self.publication.clone(),
                tables: self.tables.clone(),
                progress_interval: self.backfill.progress_interval,
            };
            self.reader = Some(BackfillReader::start(settings, control));
        }
        if self.guard.is_none() {
            self.guard = Some(SlotGuard::start(
                &self.pipeline,
                &self.config,
                &self.slot,
                self.status.clone(),
            ));
        }
        Ok(())
    }

    async fn recv(&mut self, items: &mut Vec<SourceItem>) -> Result<(), SourceError> {
        let Some(stream) = self.stream.as_mut() else {
            return Err(ReplicationError::Closed {
                target: self.config.display(),
            }
            .into());
        };
        loop {
            // The only await: decoding below is synchronous, so a cancelled call loses nothing.
            let messages = match stream.recv().await {
                Some(chunk) => chunk?,
                None => {
                    return Err(ReplicationError::Closed {
                        target: self.config.display(),
                    }
                    .into());
                }
            };
            let before = items.len();
            for message in messages {
                match message {
                    WalMessage::XLogData { data, .. } => self.events.push(data, items)?,
                    WalMessage::KeepAlive { wal_end } => self.events.keepalive(wal_end, items),
                }
            }
            // Without a backfill in flight the items go on as decoded, with no extra pass.
            if self.merge.wants(&items[before..]) {
                let mut decoded = items.split_off(before);
                self.merge.process(&mut decoded, items);
            }
            // A chunk of Begin and Relation messages only says nothing yet.
            if items.len() > before {
                return Ok(());
            }
        }
    }

    fn confirm(&mut self, lsn: Lsn) {
        if let Some(stream) = &self.stream {
            stream.confirm(lsn);
        }
        self.merge.confirm(lsn);
    }

    fn report_to(&mut self, status: &StatusHandle) {
        self.status = Some(status.clone());
    }

    async fn stop(&mut self) {
        self.guard = None;
        self.reader = None;
        if let Some(stream) = self.stream.take() {
            stream.shutdown().await.ok();
        }
    }
}

impl PostgresSource {
    /// Whether Postgres has invalidated the slot: asked when starting a session failed, since
    /// the server's refusal to stream from a lost slot is a generic "object not in
    /// prerequisite state". Unknown (no connection) counts as not lost.
    async fn slot_is_lost(&self) -> bool {
        let Ok(client) = self.config.connect_sql().await else {
            return false;
        };
        matches!(
            replication::slot_wal(&client, &self.slot).await,
            Ok(Some(wal)) if wal.is_lost()
        )
    }
}

/// The primary key columns of each watched table that has one, by (schema, table).
async fn primary_keys(
    client: &tokio_postgres::Client,
    tables: &[TableName],
) -> Result<HashMap<(String, String), Vec<String>>, ReplicationError> {
    let mut keys = HashMap::new();
    for table in tables {
        let rows = client
            .query(
                "SELECT a.attname::text FROM pg_index i
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
                 WHERE i.indrelid = to_regclass($1) AND i.indisprimary
                 ORDER BY a.attnum",
                &[&table.quoted()],
            )
            .await
            .map_err(ReplicationError::Sql)?;
        if !rows.is_empty() {
            let columns = rows.iter().map(|row| row.get(0)).collect();
            keys.insert((table.schema.clone(), table.name.clone()), columns);
        }
    }
    Ok(keys)
}
