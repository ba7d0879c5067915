//! A pipeline: one replication slot, one handler plugin, one embedder and one sink, wired
//! together and run as a task.
//!
//! A pipeline is a value built from its [`PipelineConfig`] and the shared parts a process owns
//! (the [`PluginEngine`](crate::runtime::PluginEngine), an embedder, a sink); it keeps no global
//! state, so one process can run many of them side by side.
//!
//! The loop: replication chunks -> [`pgoutput`](crate::pgoutput) messages -> [`BatchBuilder`]
//! turns them into [`ChangeEvent`]s and tracks which commits a batch completes -> the handler
//! is called with the batch (retried on a fresh instance if it fails) -> the LSN of the last
//! completed commit is confirmed to Postgres. Nothing is confirmed before the handler call that
//! covered it returned `ok`, so a crash replays and never skips.

mod batch;
mod imports;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::time::sleep;
use tracing::{info, warn};

use crate::embed::Embedder;
use crate::event::ChangeEvent;
use crate::lsn::Lsn;
use crate::replication::{
    self, ReplicationError, ReplicationStream, SourceConfig, StreamOptions, TableName, WalMessage,
};
use crate::runtime::{HandleError, HandlerInstance, Limits, Plugin, PluginEngine, RuntimeError};
use crate::sink::{Sink, SinkError};

pub use batch::{BatchBuilder, BatchError, Step};
pub use imports::{FailedImport, ImportFailure, PipelineImports};

/// How events are grouped into handler calls.
#[derive(Debug, Clone, Copy)]
pub struct BatchOptions {
    /// A handler call gets at most this many events.
    pub max_events: usize,
    /// A non-empty batch waits at most this long for more events.
    pub max_wait: Duration,
}

impl Default for BatchOptions {
    fn default() -> Self {
        BatchOptions {
            max_events: 1000,
            max_wait: Duration::from_millis(200),
        }
    }
}

/// How a failed handler call is retried.
///
/// Why it failed decides how: when the embedder or the sink refused a request (a permanent
/// [`ImportFailure`]) the pipeline stops at once, since the same call fails the same way; when
/// one of them was unavailable (transient) the call is retried for up to `outage_limit` without
/// counting against `max_attempts`, so a restarting vector store or model server is ridden
/// out; any other failure (a trap, a time or memory limit, the handler's own error) gets
/// `max_attempts` tries.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Tries per batch, the first included. After the last one the pipeline stops.
    pub max_attempts: u32,
    /// Wait before the second try; doubled after each failure, with jitter.
    pub initial_backoff: Duration,
    /// Upper bound on the wait.
    pub max_backoff: Duration,
    /// How long a batch is retried while the embedder or the sink is unavailable.
    pub outage_limit: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            outage_limit: Duration::from_secs(600),
        }
    }
}

impl RetryPolicy {
    fn backoff(&self, failed_attempts: u32) -> Duration {
        crate::backoff::jittered(failed_attempts, self.initial_backoff, self.max_backoff)
    }
}

/// Everything that defines one pipeline.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Pipeline name, used in logs and to name the slot and publication by default.
    pub name: String,
    /// The source database.
    pub source: SourceConfig,
    /// The watched tables.
    pub tables: Vec<TableName>,
    /// Replication slot name.
    pub slot: String,
    /// Publication name.
    pub publication: String,
    /// The handler component.
    pub plugin: PathBuf,
    /// Limits on each handler call.
    pub limits: Limits,
    /// Batching.
    pub batch: BatchOptions,
    /// Retries of failed handler calls.
    pub retry: RetryPolicy,
    /// Stop once every commit up to this WAL position is handled and confirmed.
    pub stop_at: Option<Lsn>,
    /// Replication stream settings.
    pub stream: StreamOptions,
    /// How often a progress line is logged.
    pub progress_interval: Duration,
}

/// Why a pipeline stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// Talking to the source database failed in a way retrying will not fix.
    #[error(transparent)]
    Replication(Box<ReplicationError>),
    /// The source failed a preflight check.
    #[error(transparent)]
    Preflight(#[from] replication::PreflightError),
    /// The plugin could not be loaded or instantiated.
    #[error("plugin {}", path.display())]
    Plugin {
        /// The plugin file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: RuntimeError,
    },
    /// The sink could not be prepared.
    #[error("cannot prepare the sink")]
    Sink(#[from] SinkError),
    /// The WAL stream held something the pipeline cannot turn into events.
    #[error(transparent)]
    Batch(#[from] BatchError),
    /// The handler failed on a batch every time it was tried; nothing from that batch on was
    /// confirmed to Postgres, so fixing the handler and restarting resumes there.
    #[error(
        "the handler failed {attempts} times on the batch of {events} events with commit LSNs \
         {first_lsn}..{last_lsn}; nothing at or after {first_lsn} was confirmed; last error"
    )]
    HandlerFailed {
        /// Tries made.
        attempts: u32,
        /// Events in the batch.
        events: usize,
        /// Commit LSN of the batch's first event.
        first_lsn: Lsn,
        /// Commit LSN of the batch's last event.
        last_lsn: Lsn,
        /// The last failure.
        #[source]
        error: HandleError,
    },
}

// Boxed: a replication error is large and every pipeline result would carry its size.
impl From<ReplicationError> for PipelineError {
    fn from(error: ReplicationError) -> Self {
        PipelineError::Replication(Box::new(error))
    }
}

/// What a pipeline did, reported when it stops.
#[derive(Debug, Clone, Default)]
pub struct RunSummary {
    /// Events handed to the handler successfully.
    pub events: u64,
    /// Successful handler calls.
    pub batches: u64,
    /// Last WAL position confirmed to Postgres.
    pub confirmed: Lsn,
    /// Times the replication connection was re-established.
    pub reconnects: u64,
}

/// A runnable pipeline.
pub struct Pipeline {
    config: PipelineConfig,
    plugin: Plugin,
    imports: Arc<PipelineImports>,
    sink: Arc<dyn Sink>,
    dimensions: usize,
    /// Kept for the progress log (its cache hit rate); calls go through `imports`.
    embedder: Arc<dyn Embedder>,
}

impl Pipeline {
    /// Loads the plugin (compiling it or taking it from the engine's cache) and wires the
    /// embedder and sink. Nothing touches the database until [`Pipeline::run`].
    pub fn new(
        config: PipelineConfig,
        engine: &PluginEngine,
        embedder: Arc<dyn Embedder>,
        sink: Arc<dyn Sink>,
    ) -> Result<Pipeline, PipelineError> {
        let plugin = engine
            .load(&config.plugin)
            .map_err(|source| PipelineError::Plugin {
                path: config.plugin.clone(),
                source,
            })?;
        let dimensions = embedder.dimensions();
        let imports = Arc::new(PipelineImports::new(embedder.clone(), sink.clone()));
        Ok(Pipeline {
            config,
            plugin,
            imports,
            sink,
            dimensions,
            embedder,
        })
    }

    /// Runs until `shutdown` resolves, `stop_at` is reached, or an error that retrying cannot
    /// fix. On shutdown the batch in flight is finished and confirmed before returning.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<RunSummary, PipelineError> {
        let config = &self.config;
        let mut shutdown = std::pin::pin!(shutdown);
        // A stop asked for while the process was starting (model, plugin): set nothing up, so
        // an aborted start leaves no slot holding WAL behind.
        if stop_requested(&mut shutdown) {
            info!(pipeline = %config.name, "stop requested before the pipeline started; nothing was set up");
            return Ok(RunSummary::default());
        }
        let client = config.source.connect_sql().await?;
        replication::preflight(&client, &config.tables).await?;
        let report =
            replication::setup(&client, &config.slot, &config.publication, &config.tables).await?;
        if report.slot_created {
            info!(pipeline = %config.name, slot = %config.slot, "created replication slot");
        }
        for table in &report.tables_with_rows {
            warn!(
                pipeline = %config.name,
                "table {table} already has rows; rows that existed before the slot was created \
                 are not delivered (backfill is not supported yet), only changes from now on"
            );
        }
        let primary_keys = primary_keys(&client, &config.tables).await?;
        let mut start = replication::slot_confirmed_flush_lsn(&client, &config.slot)
            .await?
            .unwrap_or(Lsn::ZERO);
        drop(client);
        self.sink.prepare(self.dimensions).await?;

        let mut summary = RunSummary {
            confirmed: start,
            ..RunSummary::default()
        };
        if stop_requested(&mut shutdown) {
            info!(pipeline = %config.name, confirmed = %start, "stop requested while starting; shutting down");
            return Ok(summary);
        }
        if config.stop_at.is_some_and(|stop| start >= stop) {
            info!(pipeline = %config.name, confirmed = %start, "already at --stop-at-lsn");
            return Ok(summary);
        }
        let mut handler: Option<HandlerInstance> = None;
        let mut connect_failures = 0u32;
        loop {
            let stream = match ReplicationStream::start(
                &config.source,
                &config.slot,
                &config.publication,
                start,
                config.stream.clone(),
            )
            .await
            {
                Ok(stream) => stream,
                Err(error) if error.is_retryable() && connect_failures < 10 => {
                    connect_failures += 1;
                    let wait = config.retry.backoff(connect_failures);
                    warn!(pipeline = %config.name, %error, ?wait, "cannot start replication, retrying");
                    tokio::select! {
                        _ = &mut shutdown => return Ok(summary),
                        _ = sleep(wait) => continue,
                    }
                }
                Err(error) => return Err(error.into()),
            };
            connect_failures = 0;
            info!(pipeline = %config.name, slot = %config.slot, from = %start, "streaming");
            match self
                .stream(
                    stream,
                    BatchBuilder::new(config.batch.max_events, primary_keys.clone()),
                    &mut handler,
                    &mut summary,
                    &mut shutdown,
                )
                .await?
            {
                StreamEnd::Finished => return Ok(summary),
                StreamEnd::Lost(error) => {
                    summary.reconnects += 1;
                    start = summary.confirmed;
                    warn!(
                        pipeline = %config.name, %error, resume_from = %start,
                        "replication connection lost; reconnecting and replaying unconfirmed changes"
                    );
                    let wait = config.retry.backoff(1);
                    tokio::select! {
                        _ = &mut shutdown => return Ok(summary),
                        _ = sleep(wait) => {}
                    }
                }
            }
        }
    }

    /// Drives one replication session. Returns `Lost` when the connection failed in a way a
    /// reconnect can fix; the caller then replays from the last confirmed position. A session
    /// that `Finished` is ended politely, so the server sees the last confirmation.
    async fn stream(
        &self,
        mut stream: ReplicationStream,
        builder: BatchBuilder,
        handler: &mut Option<HandlerInstance>,
        summary: &mut RunSummary,
        shutdown: &mut Pin<&mut (impl Future<Output = ()> + Send)>,
    ) -> Result<StreamEnd, PipelineError> {
        let end = self
            .drive(&mut stream, builder, handler, summary, shutdown)
            .await;
        if let Ok(StreamEnd::Finished) = end {
            stream.shutdown().await.ok();
        }
        end
    }

    async fn drive(
        &self,
        stream: &mut ReplicationStream,
        mut builder: BatchBuilder,
        handler: &mut Option<HandlerInstance>,
        summary: &mut RunSummary,
        shutdown: &mut Pin<&mut (impl Future<Output = ()> + Send)>,
    ) -> Result<StreamEnd, PipelineError> {
        let config = &self.config;
        // Whether `batch_deadline` is armed: a batch holds events and waits for more.
        let mut batch_open = false;
        // One timer, re-armed once per batch. A fresh `sleep` per received chunk would register
        // a timer per chunk, and each registration with an earlier deadline than the parked
        // worker's wakes that worker up: thousands of needless context switches per second.
        let batch_deadline = sleep(config.batch.max_wait);
        tokio::pin!(batch_deadline);
        let mut progress = Progress::new(config.progress_interval);
        loop {
            let chunk = tokio::select! {
                biased;
                _ = shutdown.as_mut() => {
                    // Handled or given up on, what is confirmed is what `summary` says.
                    self.flush(&mut builder, handler, stream, summary, None).await?;
                    info!(pipeline = %config.name, confirmed = %summary.confirmed, "shutting down");
                    return Ok(StreamEnd::Finished);
                }
                _ = &mut batch_deadline, if batch_open => {
                    let flushed = self
                        .flush(&mut builder, handler, stream, summary, Some(shutdown.as_mut()))
                        .await?;
                    if flushed == Flushed::Abandoned {
                        return Ok(StreamEnd::Finished);
                    }
                    batch_open = false;
                    continue;
                }
                chunk = stream.recv() => chunk,
            };
            let messages = match chunk {
                Some(Ok(messages)) => messages,
                Some(Err(error)) if error.is_retryable() => return Ok(StreamEnd::Lost(error)),
                Some(Err(error)) => return Err(error.into()),
                None => {
                    return Ok(StreamEnd::Lost(ReplicationError::Closed {
                        target: config.source.display(),
                    }));
                }
            };
            for message in messages {
                let step = match message {
                    WalMessage::XLogData { data, .. } => builder.push(data)?,
                    WalMessage::KeepAlive { wal_end } => builder.keepalive(wal_end),
                };
                match step {
                    Step::Continue => {}
                    Step::Confirm(lsn) => confirm(stream, summary, lsn),
                    Step::BatchFull if stop_requested(shutdown) => {
                        // The stop came while this chunk was being read: finish this batch,
                        // leave the rest of the chunk to the next start.
                        self.flush(&mut builder, handler, stream, summary, None)
                            .await?;
                        info!(pipeline = %config.name, confirmed = %summary.confirmed, "shutting down");
                        return Ok(StreamEnd::Finished);
                    }
                    Step::BatchFull => {
                        let flushed = self
                            .flush(
                                &mut builder,
                                handler,
                                stream,
                                summary,
                                Some(shutdown.as_mut()),
                            )
                            .await?;
                        if flushed == Flushed::Abandoned {
                            return Ok(StreamEnd::Finished);
                        }
                        batch_open = false;
                    }
                }
                if !batch_open && !builder.is_empty() {
                    batch_open = true;
                    batch_deadline
                        .as_mut()
                        .reset(tokio::time::Instant::now() + config.batch.max_wait);
                }
                if let Some(stop) = config.stop_at
                    && builder.reached(stop)
                {
                    let flushed = self
                        .flush(
                            &mut builder,
                            handler,
                            stream,
                            summary,
                            Some(shutdown.as_mut()),
                        )
                        .await?;
                    if flushed == Flushed::Abandoned {
                        return Ok(StreamEnd::Finished);
                    }
                    if summary.confirmed >= stop {
                        info!(pipeline = %config.name, confirmed = %summary.confirmed, "reached --stop-at-lsn");
                        return Ok(StreamEnd::Finished);
                    }
                }
            }
            progress.tick(&config.name, summary, self.embedder.as_ref());
        }
    }

    /// Hands the pending events to the handler and confirms what they complete.
    ///
    /// `shutdown` is the stop request still to come, watched while a failed call waits for its
    /// retry; `None` means the stop was already asked for, so a failure is not retried at all.
    /// Either way a batch given up on is not confirmed, and the next start replays it.
    async fn flush(
        &self,
        builder: &mut BatchBuilder,
        handler: &mut Option<HandlerInstance>,
        stream: &ReplicationStream,
        summary: &mut RunSummary,
        shutdown: Option<Pin<&mut (dyn Future<Output = ()> + Send)>>,
    ) -> Result<Flushed, PipelineError> {
        let (events, completes) = builder.take();
        if !events.is_empty() {
            if self.handle_with_retry(handler, &events, shutdown).await? == Flushed::Abandoned {
                warn!(
                    pipeline = %self.config.name, events = events.len(),
                    confirmed = %summary.confirmed,
                    "stopping with a failed batch not confirmed; the next start replays it"
                );
                return Ok(Flushed::Abandoned);
            }
            summary.events += events.len() as u64;
            summary.batches += 1;
        }
        if let Some(lsn) = completes {
            confirm(stream, summary, lsn);
        }
        builder.recycle(events);
        Ok(Flushed::Done)
    }

    async fn handle_with_retry(
        &self,
        handler: &mut Option<HandlerInstance>,
        events: &[ChangeEvent],
        mut shutdown: Option<Pin<&mut (dyn Future<Output = ()> + Send)>>,
    ) -> Result<Flushed, PipelineError> {
        let config = &self.config;
        // Tries that failed for another reason than an outage, and tries in all.
        let mut attempt = 0;
        let mut tries = 0;
        let mut outage_started: Option<tokio::time::Instant> = None;
        loop {
            attempt += 1;
            tries += 1;
            self.imports.take_failure();
            let instance = match handler {
                Some(instance) => instance,
                None => handler.insert(
                    self.plugin
                        .instantiate(self.imports.clone(), config.limits, &self.log_target())
                        .await
                        .map_err(|source| PipelineError::Plugin {
                            path: config.plugin.clone(),
                            source,
                        })?,
                ),
            };
            let (error, failed_import) = match instance.handle(events).await {
                Ok(()) => match self.imports.take_failure() {
                    None => return Ok(Flushed::Done),
                    // The guest caught a failed write and went on: confirming the batch would
                    // lose what it could not write.
                    Some(failed) => (
                        HandleError::IgnoredHostFailure(failed.message.clone()),
                        Some(failed),
                    ),
                },
                Err(error) => (error, self.imports.take_failure()),
            };
            // A failed instance may hold half-updated guest state (or be poisoned by a trap):
            // the retry always starts from a fresh one.
            *handler = None;
            let first_lsn = events.first().map_or(Lsn::ZERO, |event| event.lsn);
            let last_lsn = events.last().map_or(Lsn::ZERO, |event| event.lsn);
            let failed = |attempts, error| PipelineError::HandlerFailed {
                attempts,
                events: events.len(),
                first_lsn,
                last_lsn,
                error,
            };
            let import_failure = failed_import.map(|failed| failed.kind);
            match import_failure {
                Some(ImportFailure::Permanent) => {
                    warn!(
                        pipeline = %config.name, %first_lsn,
                        "the embedder or the sink refused a request of this batch; retrying \
                         cannot help, stopping"
                    );
                    return Err(failed(tries, error));
                }
                Some(ImportFailure::Transient) => {
                    // An outage does not use up the batch's tries; its length is bounded.
                    attempt -= 1;
                    let started = *outage_started.get_or_insert_with(tokio::time::Instant::now);
                    if started.elapsed() >= config.retry.outage_limit {
                        return Err(failed(tries, error));
                    }
                }
                None => {
                    outage_started = None;
                    if attempt >= config.retry.max_attempts {
                        return Err(failed(tries, error));
                    }
                }
            }
            // A stop asked for before this try: the operator wants the process gone, not an
            // outage ridden out. The batch stays unconfirmed and is replayed at the next start.
            let Some(shutdown) = shutdown.as_mut() else {
                warn!(pipeline = %config.name, %first_lsn, %error, "the batch failed while stopping");
                return Ok(Flushed::Abandoned);
            };
            let wait = config.retry.backoff(tries);
            if import_failure.is_some() {
                warn!(
                    pipeline = %config.name, try_number = tries, %first_lsn, ?wait,
                    outage_limit = ?config.retry.outage_limit, %error,
                    "the embedder or the sink is unavailable; retrying the batch until it is back"
                );
            } else {
                warn!(
                    pipeline = %config.name, attempt, max_attempts = config.retry.max_attempts,
                    %first_lsn, ?wait, %error,
                    "handler failed; retrying the batch on a fresh instance"
                );
            }
            tokio::select! {
                _ = shutdown.as_mut() => return Ok(Flushed::Abandoned),
                _ = sleep(wait) => {}
            }
        }
    }

    fn log_target(&self) -> String {
        let plugin = self
            .config
            .plugin
            .file_stem()
            .map(|stem| stem.to_string_lossy().into_owned())
            .unwrap_or_default();
        format!("{}/{}", self.config.name, plugin)
    }
}

/// The primary key columns of each watched table that has one, by (schema, table).
pub async fn primary_keys(
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

/// Whether the stop request has come, without waiting for it. Once this returns true the
/// future has finished and must not be polled again: every caller returns at once.
fn stop_requested(shutdown: &mut Pin<&mut (impl Future<Output = ()> + Send)>) -> bool {
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    shutdown.as_mut().poll(&mut context).is_ready()
}

fn confirm(stream: &ReplicationStream, summary: &mut RunSummary, lsn: Lsn) {
    if lsn > summary.confirmed {
        stream.confirm(lsn);
        summary.confirmed = lsn;
    }
}

enum StreamEnd {
    Finished,
    Lost(ReplicationError),
}

/// What became of a batch handed to the handler.
#[derive(Debug, PartialEq, Eq)]
enum Flushed {
    /// Handled, and the commits it completes confirmed.
    Done,
    /// Failed, and a stop was asked for before it could be retried: not confirmed.
    Abandoned,
}

/// Logs a progress line at most every `interval`.
struct Progress {
    interval: Duration,
    last: Instant,
    last_events: u64,
}

impl Progress {
    fn new(interval: Duration) -> Progress {
        Progress {
            interval,
            last: Instant::now(),
            last_events: 0,
        }
    }

    fn tick(&mut self, name: &str, summary: &RunSummary, embedder: &dyn Embedder) {
        let elapsed = self.last.elapsed();
        if elapsed < self.interval {
            return;
        }
        let rate = (summary.events - self.last_events) as f64 / elapsed.as_secs_f64();
        match embedder.cache_stats() {
            Some(cache) => info!(
                pipeline = %name, events = summary.events, events_per_sec = rate.round(),
                confirmed = %summary.confirmed,
                embed_cache_hit_rate = format_args!("{:.3}", cache.hit_rate()),
                texts_embedded = cache.texts_embedded, "progress"
            ),
            None => info!(
                pipeline = %name, events = summary.events, events_per_sec = rate.round(),
                confirmed = %summary.confirmed, "progress"
            ),
        }
        self.last = Instant::now();
        self.last_events = summary.events;
    }
}
