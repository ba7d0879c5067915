//! A pipeline: one change source, one handler plugin, one embedder and one sink, wired
//! together and run as a task.
//!
//! A pipeline is a value built from its [`PipelineConfig`] and its parts (a loaded
//! [`Plugin`], an embedder, a sink, a [`ChangeSource`]); it keeps no global state, so one
//! process can run many of them side by side. [`crate::assembly`] builds one from a
//! [`PipelineSpec`](crate::config::PipelineSpec), [`crate::supervisor`] runs many.
//!
//! The loop: source items -> [`BatchBuilder`] groups the changes into batches and tracks which
//! commits a batch completes -> the handler is called with the batch (retried on a fresh
//! instance if it fails) -> the position of the last completed commit is confirmed to the
//! source. Nothing is confirmed before the handler call that covered it returned `ok`, so a
//! crash replays and never skips.

mod batch;
mod imports;
mod status;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::time::sleep;
use tracing::{debug, error, info, warn};

use crate::dead_letter::{DeadLetter, DeadLetterError, DeadLetterStore, OnFailure};
use crate::embed::Embedder;
use crate::event::ChangeEvent;
use crate::lsn::Lsn;
use crate::metrics::{FailureCause, PipelineMetrics, ReloadOutcome};
use crate::reload::ReloadListener;
use crate::replication::TableName;
use crate::runtime::{HandleError, HandlerInstance, ImportErrorKind, Limits, Plugin, RuntimeError};
use crate::sink::{Sink, SinkError};
use crate::source::{ChangeSource, SourceError, SourceItem};

pub use batch::{BatchBuilder, Step};
pub use imports::PipelineImports;
pub use status::{PipelineState, PipelineStatus, StatusHandle};

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

/// How a failed handler call, or a lost source, is retried.
///
/// Why it failed decides how: when the embedder or the sink refused a request
/// ([`ImportErrorKind::Refused`]) the pipeline stops at once, since the same call fails the
/// same way; when one of them was unavailable, or the source cannot be reached, the pipeline
/// retries for up to `outage_limit` without counting against `max_attempts`, so a restarting
/// vector store, model server or database is ridden out; any other failure (a trap, a time or
/// memory limit, the handler's own error) gets `max_attempts` tries.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Tries per batch, the first included. After the last one the pipeline stops.
    pub max_attempts: u32,
    /// Wait before the second try; doubled after each failure, with jitter.
    pub initial_backoff: Duration,
    /// Upper bound on the wait after a failed handler call.
    pub max_backoff: Duration,
    /// How long a batch (or a reconnect) is retried while a dependency is unavailable.
    pub outage_limit: Duration,
    /// Upper bound on the wait between tries during an outage: small, so the pipeline
    /// resumes within seconds of the dependency coming back.
    pub outage_max_wait: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            outage_limit: Duration::from_secs(600),
            outage_max_wait: Duration::from_secs(3),
        }
    }
}

impl RetryPolicy {
    fn backoff(&self, failed_attempts: u32) -> Duration {
        crate::backoff::jittered(failed_attempts, self.initial_backoff, self.max_backoff)
    }

    fn outage_backoff(&self, failed_tries: u32) -> Duration {
        let cap = self.outage_max_wait.min(self.max_backoff);
        crate::backoff::jittered(failed_tries, self.initial_backoff.min(cap), cap)
    }
}

/// How one pipeline runs, apart from its parts.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Pipeline name, used in logs.
    pub name: String,
    /// The replication slot the source reads, a field of the log lines that tell positions.
    pub slot: String,
    /// The handler component's file, for errors and the plugin's log name.
    pub plugin: PathBuf,
    /// The tables the pipeline watches: its handler may write points of these only.
    pub tables: Vec<TableName>,
    /// Limits on each handler call.
    pub limits: Limits,
    /// Batching.
    pub batch: BatchOptions,
    /// Retries of failed handler calls and lost sources.
    pub retry: RetryPolicy,
    /// Stop once every commit up to this position is handled and confirmed.
    pub stop_at: Option<Lsn>,
    /// How often a progress line is logged.
    pub progress_interval: Duration,
    /// What happens to a batch that keeps failing for a reason that is not an outage; with
    /// [`OnFailure::DeadLetter`] the pipeline needs [`Pipeline::with_dead_letters`].
    pub on_failure: OnFailure,
}

/// Why a pipeline stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The source failed in a way retrying will not fix, or stayed unreachable for longer
    /// than the outage limit.
    #[error(transparent)]
    Source(#[from] SourceError),
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
    /// Events given up on could not be recorded in the dead-letter table; their batch was not
    /// confirmed, so the next start finds them again.
    #[error("cannot record {events} dead letters in {location}; their batch was not confirmed")]
    DeadLetter {
        /// Events to record.
        events: usize,
        /// Where the table is.
        location: String,
        /// Why.
        #[source]
        source: DeadLetterError,
    },
    /// The handler failed on a batch every time it was tried; nothing from that batch on was
    /// confirmed, so fixing the handler and restarting resumes there.
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
        /// Whether the last failure was an outage of the embedder or the sink that outlasted
        /// the outage limit (rather than a refusal or the handler's own failure).
        outage: bool,
        /// The last failure.
        #[source]
        error: HandleError,
    },
}

impl PipelineError {
    /// The error in one short line, for a status display (the log has it whole).
    pub fn summary(&self) -> String {
        match self {
            PipelineError::HandlerFailed {
                attempts,
                first_lsn,
                error,
                ..
            } => format!(
                "the handler failed {attempts} times on the batch at {first_lsn}: {}",
                error.summary()
            ),
            other => crate::error_chain::one_line(other),
        }
    }

    /// Whether starting the pipeline again later may succeed without anyone changing
    /// anything: a dependency that was down for too long, or a source that was lost.
    pub fn is_retryable(&self) -> bool {
        match self {
            PipelineError::Source(error) => error.is_retryable(),
            PipelineError::Sink(error) => error.is_retryable(),
            PipelineError::HandlerFailed { outage, .. } => *outage,
            PipelineError::DeadLetter { source, .. } => source.is_retryable(),
            PipelineError::Plugin { .. } => false,
        }
    }
}

/// What a pipeline did, reported when it stops.
#[derive(Debug, Clone, Default)]
pub struct RunSummary {
    /// Events handed to the handler successfully.
    pub events: u64,
    /// Successful handler calls.
    pub batches: u64,
    /// Last position confirmed to the source.
    pub confirmed: Lsn,
    /// Times the source was started again after it was lost.
    pub reconnects: u64,
}

/// A runnable pipeline.
pub struct Pipeline {
    config: PipelineConfig,
    plugin: Plugin,
    imports: Arc<PipelineImports>,
    sink: Arc<dyn Sink>,
    source: Box<dyn ChangeSource>,
    dimensions: usize,
    /// Kept for the progress log (its cache hit rate); calls go through `imports`.
    embedder: Arc<dyn Embedder>,
    status: StatusHandle,
    metrics: PipelineMetrics,
    /// Where hot-reload requests come from, if anywhere.
    reloads: Option<ReloadListener>,
    /// The new version being loaded, off the hot path.
    pending_reload: Option<PendingReload>,
    /// When the reload whose version now runs was asked for, until its first batch is done.
    first_batch_of_reload: Option<Instant>,
    /// Where the running version is published, for whoever starts this pipeline again.
    running_plugin: Option<RunningPlugin>,
    /// Where events given up on go, with [`OnFailure::DeadLetter`].
    dead_letters: Option<DeadLetterStore>,
}

/// The plugin version a pipeline runs, kept up to date across hot reloads; a supervisor
/// holds one per pipeline so a restart can fall back on it. Cheap to clone.
#[derive(Clone, Default)]
pub struct RunningPlugin(Arc<std::sync::Mutex<Option<Plugin>>>);

impl RunningPlugin {
    /// The version running (or last run), if any.
    pub fn get(&self) -> Option<Plugin> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn set(&self, plugin: &Plugin) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(plugin.clone());
    }
}

/// A reload in progress: the new version loading and instantiating in its own task.
struct PendingReload {
    requested: Instant,
    task: tokio::task::JoinHandle<Result<Option<Reloaded>, ReloadRejected>>,
}

/// A new version, loaded and instantiated, ready to take the next batch.
struct Reloaded {
    plugin: Plugin,
    instance: HandlerInstance,
}

/// Why a new version of the plugin was not taken.
#[derive(Debug, thiserror::Error)]
enum ReloadRejected {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("loading the new version panicked")]
    Panicked,
}

impl Pipeline {
    /// Wires a loaded plugin, an embedder, a sink and a source. Nothing is touched until
    /// [`Pipeline::run`].
    pub fn new(
        config: PipelineConfig,
        plugin: Plugin,
        embedder: Arc<dyn Embedder>,
        sink: Arc<dyn Sink>,
        source: Box<dyn ChangeSource>,
    ) -> Pipeline {
        let dimensions = embedder.dimensions();
        let imports = Arc::new(PipelineImports::new(
            embedder.clone(),
            sink.clone(),
            &config.tables,
        ));
        let status = StatusHandle::new(&config.name);
        status.set_embedder(embedder.clone());
        let mut source = source;
        source.report_to(&status);
        Pipeline {
            config,
            plugin,
            imports,
            sink,
            source,
            dimensions,
            embedder,
            status,
            metrics: PipelineMetrics::default(),
            reloads: None,
            pending_reload: None,
            first_batch_of_reload: None,
            running_plugin: None,
            dead_letters: None,
        }
    }

    /// Records events given up on in `store` (used with [`OnFailure::DeadLetter`]).
    pub fn with_dead_letters(mut self, store: DeadLetterStore) -> Pipeline {
        self.dead_letters = Some(store);
        self
    }

    /// Keeps `running` up to date with the version this pipeline runs.
    pub fn with_running_plugin(mut self, running: RunningPlugin) -> Pipeline {
        running.set(&self.plugin);
        self.running_plugin = Some(running);
        self
    }

    /// Takes a new version of the plugin file each time `reloads` fires: loaded and
    /// instantiated beside the running one, swapped in between two batches (the batch in
    /// flight finishes on the old version, nothing is replayed or skipped), or rejected with
    /// an error in the log while the old version keeps running.
    pub fn with_reloads(mut self, reloads: ReloadListener) -> Pipeline {
        self.reloads = Some(reloads);
        self
    }

    /// Counts into `metrics` (the process's registry) instead of metrics of its own.
    pub fn with_metrics(mut self, metrics: PipelineMetrics) -> Pipeline {
        self.imports = Arc::new(
            PipelineImports::new(
                self.embedder.clone(),
                self.sink.clone(),
                &self.config.tables,
            )
            .with_metrics(metrics.clone()),
        );
        self.metrics = metrics;
        self
    }

    /// Reports into `status` instead of a handle of its own (a supervisor keeps one per
    /// pipeline across restarts).
    pub fn with_status(mut self, status: StatusHandle) -> Pipeline {
        self.source.report_to(&status);
        status.set_embedder(self.embedder.clone());
        self.status = status;
        self
    }

    /// The handle on this pipeline's status.
    pub fn status(&self) -> StatusHandle {
        self.status.clone()
    }

    /// Runs until `shutdown` resolves, `stop_at` is reached, or an error that retrying cannot
    /// fix. On shutdown the batch in flight is finished and confirmed before returning. Logs
    /// what it did as it stops (and the embedding cache's figures when there is one).
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<RunSummary, PipelineError> {
        let name = self.config.name.clone();
        let slot = self.config.slot.clone();
        let embedder = self.embedder.clone();
        let result = self.run_to_end(shutdown).await;
        if let Some(cache) = embedder.cache_stats() {
            info!(
                pipeline = %name,
                hits = cache.hits,
                misses = cache.misses,
                hit_rate = format_args!("{:.3}", cache.hit_rate()),
                texts_embedded = cache.texts_embedded,
                model_requests = cache.model_requests,
                evictions = cache.evictions,
                "embedding cache"
            );
        }
        if let Ok(summary) = &result {
            info!(
                pipeline = %name,
                slot = %slot,
                events = summary.events,
                batches = summary.batches,
                confirmed = %summary.confirmed,
                reconnects = summary.reconnects,
                "stopped"
            );
        }
        result
    }

    async fn run_to_end(
        mut self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<RunSummary, PipelineError> {
        let mut shutdown = std::pin::pin!(shutdown);
        self.status.set_state(PipelineState::Starting);
        // A stop asked for while the process was starting (model, plugin): set nothing up, so
        // an aborted start leaves no slot holding WAL behind.
        if stop_requested(&mut shutdown) {
            info!(pipeline = %self.config.name, "stop requested before the pipeline started; nothing was set up");
            return Ok(RunSummary::default());
        }
        // Instantiated before anything else, so a plugin that cannot start (a missing import,
        // start code that traps, a memory limit too small for it) fails now, not when the
        // first change arrives, possibly hours later, and before a slot is made for it.
        let mut handler = Some(self.instantiate().await?);
        self.status.set_plugin(self.plugin.digest());
        let start = self.source.prepare().await?;
        self.sink.prepare(self.dimensions).await?;
        let mut summary = RunSummary {
            confirmed: start,
            ..RunSummary::default()
        };
        self.status.set_confirmed(start);
        let config = self.config.clone();
        if stop_requested(&mut shutdown) {
            info!(pipeline = %config.name, confirmed = %start, "stop requested while starting; shutting down");
            return Ok(summary);
        }
        if config.stop_at.is_some_and(|stop| start >= stop) {
            info!(pipeline = %config.name, confirmed = %start, "already at --stop-at-lsn");
            return Ok(summary);
        }
        let mut outage: Option<Outage> = None;
        loop {
            let from = summary.confirmed;
            let started = self.source.start(from).await;
            if let Err(error) = started {
                if !error.is_retryable() {
                    return Err(error.into());
                }
                let outage = outage.get_or_insert_with(Outage::begin);
                if outage.started.elapsed() >= config.retry.outage_limit {
                    return Err(error.into());
                }
                outage.tries += 1;
                let wait = config.retry.outage_backoff(outage.tries);
                let reason = format!("cannot start {}: {error}", self.source.describe());
                self.status.set_state(PipelineState::Retrying {
                    reason: reason.clone(),
                });
                warn!(pipeline = %config.name, %error, ?wait, "cannot start the source, retrying");
                tokio::select! {
                    _ = &mut shutdown => {
                        self.status.set_state(PipelineState::Stopped);
                        return Ok(summary);
                    }
                    _ = sleep(wait) => continue,
                }
            }
            outage = None;
            self.status.set_state(PipelineState::Streaming);
            info!(pipeline = %config.name, slot = %config.slot, source = %self.source.describe(), from = %from, "streaming");
            let end = self
                .drive(
                    BatchBuilder::new(config.batch.max_events),
                    &mut handler,
                    &mut summary,
                    &mut shutdown,
                )
                .await;
            match end {
                Ok(StreamEnd::Finished) => {
                    self.source.stop().await;
                    self.status.set_state(PipelineState::Stopped);
                    return Ok(summary);
                }
                Ok(StreamEnd::Lost(error)) => {
                    summary.reconnects += 1;
                    warn!(
                        pipeline = %config.name, %error, resume_from = %summary.confirmed,
                        "source lost; reconnecting and replaying unconfirmed changes"
                    );
                    self.status.set_state(PipelineState::Retrying {
                        reason: format!("source lost: {error}"),
                    });
                    let wait = config.retry.outage_backoff(1);
                    tokio::select! {
                        _ = &mut shutdown => {
                            self.status.set_state(PipelineState::Stopped);
                            return Ok(summary);
                        }
                        _ = sleep(wait) => {}
                    }
                }
                Err(error) => {
                    self.source.stop().await;
                    return Err(error);
                }
            }
        }
    }

    /// Starts loading the plugin file as it is now, in a task of its own: compiling runs on
    /// the blocking pool and instantiating beside the running instance, so the stream goes
    /// on meanwhile.
    fn begin_reload(&mut self, requested: Instant) {
        let running = self.plugin.clone();
        let imports = self.imports.clone();
        let limits = self.config.limits;
        let log_target = self.log_target();
        info!(pipeline = %self.config.name, path = %running.path().display(), "reload requested; loading the plugin file");
        let task = tokio::spawn(async move {
            let current = running.digest();
            let plugin = tokio::task::spawn_blocking(move || running.load_again())
                .await
                .map_err(|_| ReloadRejected::Panicked)??;
            if plugin.digest() == current {
                return Ok(None);
            }
            let instance = plugin.instantiate(imports, limits, &log_target).await?;
            Ok(Some(Reloaded { plugin, instance }))
        });
        self.pending_reload = Some(PendingReload { requested, task });
    }

    /// Takes the loaded version (the next batch runs on it), or keeps the running one.
    fn swap_in(
        &mut self,
        requested: Instant,
        loaded: Result<Option<Reloaded>, ReloadRejected>,
        handler: &mut Option<HandlerInstance>,
    ) {
        let name = &self.config.name;
        let path = self.plugin.path().display().to_string();
        match loaded {
            Ok(Some(Reloaded { plugin, instance })) => {
                info!(
                    pipeline = %name, %path, from = %self.plugin.digest(), to = %plugin.digest(),
                    load_ms = requested.elapsed().as_millis() as u64,
                    "plugin reloaded; the next batch runs on the new version"
                );
                *handler = Some(instance);
                if let Some(running) = &self.running_plugin {
                    running.set(&plugin);
                }
                self.plugin = plugin;
                self.first_batch_of_reload = Some(requested);
                self.status.set_plugin(self.plugin.digest());
                self.metrics.reloaded(ReloadOutcome::Applied);
            }
            Ok(None) => {
                info!(pipeline = %name, %path, plugin = %self.plugin.digest(), "plugin file unchanged; keeping the running instance");
                self.metrics.reloaded(ReloadOutcome::Unchanged);
            }
            Err(rejected) => {
                let error = crate::error_chain::one_line(&rejected);
                error!(
                    pipeline = %name, %path, running = %self.plugin.digest(), %error,
                    "new plugin version rejected; the running version keeps handling changes"
                );
                self.metrics.reloaded(ReloadOutcome::Rejected);
            }
        }
    }

    async fn instantiate(&self) -> Result<HandlerInstance, PipelineError> {
        self.plugin
            .instantiate(self.imports.clone(), self.config.limits, &self.log_target())
            .await
            .map_err(|source| PipelineError::Plugin {
                path: self.config.plugin.clone(),
                source,
            })
    }

    /// Drives one session of the source. Returns `Lost` when the source failed in a way a
    /// restart can fix; the caller then replays from the last confirmed position.
    async fn drive(
        &mut self,
        mut builder: BatchBuilder,
        handler: &mut Option<HandlerInstance>,
        summary: &mut RunSummary,
        shutdown: &mut Pin<&mut (impl Future<Output = ()> + Send)>,
    ) -> Result<StreamEnd, PipelineError> {
        let config = self.config.clone();
        // Whether `batch_deadline` is armed: a batch holds events and waits for more.
        let mut batch_open = false;
        // One timer, re-armed once per batch. A fresh `sleep` per received chunk would register
        // a timer per chunk, and each registration with an earlier deadline than the parked
        // worker's wakes that worker up: thousands of needless context switches per second.
        let batch_deadline = sleep(config.batch.max_wait);
        tokio::pin!(batch_deadline);
        let mut progress = Progress::new(config.progress_interval);
        let mut items: Vec<SourceItem> = Vec::new();
        loop {
            let received = tokio::select! {
                biased;
                _ = shutdown.as_mut() => {
                    // Handled or given up on, what is confirmed is what `summary` says.
                    self.flush(&mut builder, handler, summary, &mut progress, None).await?;
                    info!(pipeline = %config.name, slot = %config.slot, confirmed = %summary.confirmed, "shutting down");
                    return Ok(StreamEnd::Finished);
                }
                _ = &mut batch_deadline, if batch_open => {
                    let flushed = self
                        .flush(&mut builder, handler, summary, &mut progress, Some(shutdown.as_mut()))
                        .await?;
                    if flushed == Flushed::Abandoned {
                        return Ok(StreamEnd::Finished);
                    }
                    batch_open = false;
                    continue;
                }
                // Between two handler calls: the only place a new version is swapped in.
                (requested, loaded) = reload_loaded(&mut self.pending_reload) => {
                    self.swap_in(requested, loaded, handler);
                    continue;
                }
                requested = reload_requested(&mut self.reloads), if self.pending_reload.is_none() => {
                    match requested {
                        Some(requested) => self.begin_reload(requested),
                        None => self.reloads = None,
                    }
                    continue;
                }
                received = self.source.recv(&mut items) => received,
            };
            match received {
                Ok(()) => {}
                Err(error) if error.is_retryable() => return Ok(StreamEnd::Lost(error)),
                Err(error) => return Err(error.into()),
            }
            let mut pending = items.drain(..);
            while let Some(item) = pending.next() {
                match builder.push(item) {
                    Step::Continue => {}
                    Step::Confirm(lsn) => self.confirm(summary, lsn),
                    Step::BatchFull if stop_requested(shutdown) => {
                        // The stop came while these items were being read: finish this batch,
                        // leave the rest to the next start.
                        drop(pending);
                        items.clear();
                        self.flush(&mut builder, handler, summary, &mut progress, None)
                            .await?;
                        info!(pipeline = %config.name, slot = %config.slot, confirmed = %summary.confirmed, "shutting down");
                        return Ok(StreamEnd::Finished);
                    }
                    Step::BatchFull => {
                        let flushed = self
                            .flush(
                                &mut builder,
                                handler,
                                summary,
                                &mut progress,
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
                            summary,
                            &mut progress,
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
            progress.tick(&config, summary, self.embedder.as_ref());
        }
    }

    fn confirm(&mut self, summary: &mut RunSummary, lsn: Lsn) {
        if lsn > summary.confirmed {
            self.source.confirm(lsn);
            summary.confirmed = lsn;
            self.status.set_confirmed(lsn);
        }
    }

    /// Hands the pending events to the handler and confirms what they complete.
    ///
    /// `shutdown` is the stop request still to come, watched while a failed call waits for its
    /// retry; `None` means the stop was already asked for, so a failure is not retried at all.
    /// Either way a batch given up on is not confirmed, and the next start replays it.
    async fn flush(
        &mut self,
        builder: &mut BatchBuilder,
        handler: &mut Option<HandlerInstance>,
        summary: &mut RunSummary,
        progress: &mut Progress,
        shutdown: Option<Pin<&mut (dyn Future<Output = ()> + Send)>>,
    ) -> Result<Flushed, PipelineError> {
        let (events, completes) = builder.take();
        if !events.is_empty() {
            let handled = self
                .handle_or_dead_letter(handler, &events, summary, progress, shutdown)
                .await?;
            if handled == Flushed::Abandoned {
                warn!(
                    pipeline = %self.config.name, events = events.len(),
                    confirmed = %summary.confirmed,
                    "stopping with a failed batch not confirmed; the next start replays it"
                );
                return Ok(Flushed::Abandoned);
            }
            summary.events += events.len() as u64;
            summary.batches += 1;
            self.status.add_events(events.len() as u64);
            if let Some(requested) = self.first_batch_of_reload.take() {
                let latency = requested.elapsed();
                info!(
                    pipeline = %self.config.name, plugin = %self.plugin.digest(),
                    swap_latency_ms = latency.as_millis() as u64,
                    "first batch handled by the reloaded plugin"
                );
                self.metrics.reload_latency(latency);
            }
        }
        if let Some(lsn) = completes {
            self.confirm(summary, lsn);
        }
        builder.recycle(events);
        Ok(Flushed::Done)
    }

    /// [`handle_with_retry`](Self::handle_with_retry) with the configured number of tries;
    /// with [`OnFailure::DeadLetter`], a batch that still fails for a reason that is not an
    /// outage is split to find the events that fail on their own, which are recorded as dead
    /// letters while every other event is handled, in order.
    ///
    /// The search halves the failing part of the batch until single events remain; a part is
    /// tried once, a single event as often as a batch is. An outage during the search is
    /// ridden out as always, and never makes a dead letter. Everything recorded, the batch
    /// counts as handled and is confirmed; if recording fails, nothing of it is.
    async fn handle_or_dead_letter<'s>(
        &self,
        handler: &mut Option<HandlerInstance>,
        events: &[ChangeEvent],
        summary: &RunSummary,
        progress: &mut Progress,
        mut shutdown: Option<Pin<&mut (dyn Future<Output = ()> + Send + 's)>>,
    ) -> Result<Flushed, PipelineError> {
        let max_attempts = self.config.retry.max_attempts;
        let dead_letters = match (&self.config.on_failure, &self.dead_letters) {
            (OnFailure::DeadLetter, Some(store)) => store,
            _ => {
                return self
                    .handle_with_retry(handler, events, summary, progress, shutdown, max_attempts)
                    .await;
            }
        };
        let first = self
            .handle_with_retry(
                handler,
                events,
                summary,
                progress,
                shutdown.as_mut().map(|s| s.as_mut()),
                max_attempts,
            )
            .await;
        let (error, attempts) = match first {
            Err(PipelineError::HandlerFailed {
                outage: false,
                error,
                attempts,
                ..
            }) => (error, attempts),
            other => return other,
        };
        warn!(
            pipeline = %self.config.name, events = events.len(),
            first_lsn = %events[0].lsn,
            "the batch keeps failing; looking for the events that fail on their own, to \
             dead-letter them and handle the others"
        );
        let mut letters = Vec::new();
        // Parts that failed, to split, and parts still to try (the next one last), so events
        // are handled in the batch's order.
        let mut failed = Some((0..events.len(), error, attempts));
        let mut parts = Vec::new();
        loop {
            if let Some((part, error, attempts)) = failed.take() {
                if part.len() == 1 {
                    let event = &events[part.start];
                    warn!(
                        pipeline = %self.config.name, lsn = %event.lsn,
                        table = %format!("{}.{}", event.relation.schema, event.relation.table),
                        error = %error.summary(),
                        "dead-lettering an event that fails on its own"
                    );
                    letters.push(DeadLetter {
                        event: event.clone(),
                        error: crate::error_chain::one_line(&error),
                        attempts,
                    });
                } else {
                    let middle = part.start + part.len().div_ceil(2);
                    parts.push(middle..part.end);
                    parts.push(part.start..middle);
                }
            }
            let Some(part) = parts.pop() else {
                break;
            };
            let attempts = if part.len() == 1 { max_attempts } else { 1 };
            match self
                .handle_with_retry(
                    handler,
                    &events[part.clone()],
                    summary,
                    progress,
                    shutdown.as_mut().map(|s| s.as_mut()),
                    attempts,
                )
                .await
            {
                Ok(Flushed::Done) => {}
                Ok(Flushed::Abandoned) => return Ok(Flushed::Abandoned),
                Err(PipelineError::HandlerFailed {
                    outage: false,
                    error,
                    attempts,
                    ..
                }) => failed = Some((part, error, attempts)),
                Err(other) => return Err(other),
            }
        }
        if !letters.is_empty() {
            dead_letters
                .record(&self.config.name, &self.config.slot, &letters)
                .await
                .map_err(|source| PipelineError::DeadLetter {
                    events: letters.len(),
                    location: dead_letters.location().to_owned(),
                    source,
                })?;
            self.metrics.dead_lettered(letters.len());
            warn!(
                pipeline = %self.config.name, dead_letters = letters.len(),
                handled = events.len() - letters.len(), location = %dead_letters.location(),
                "events dead-lettered; `pgstream-host dead-letters list` shows them, `replay` \
                 runs them through the handler again"
            );
        }
        self.status.set_state(PipelineState::Streaming);
        Ok(Flushed::Done)
    }

    async fn handle_with_retry<'s>(
        &self,
        handler: &mut Option<HandlerInstance>,
        events: &[ChangeEvent],
        summary: &RunSummary,
        progress: &mut Progress,
        mut shutdown: Option<Pin<&mut (dyn Future<Output = ()> + Send + 's)>>,
        max_attempts: u32,
    ) -> Result<Flushed, PipelineError> {
        let config = &self.config;
        // Tries that failed for another reason than an outage, and tries in all.
        let mut attempt = 0;
        let mut tries = 0;
        let mut outage: Option<Outage> = None;
        loop {
            attempt += 1;
            tries += 1;
            self.sink.begin_batch(events);
            let instance = match handler {
                Some(instance) => instance,
                None => handler.insert(self.instantiate().await?),
            };
            let called = Instant::now();
            let outcome = instance.handle(events).await;
            let took = called.elapsed();
            let error = match outcome {
                Ok(()) => {
                    self.metrics.batch_handled(events, took);
                    if tries > 1 {
                        info!(pipeline = %config.name, tries, "the batch went through after retrying");
                        self.status.set_state(PipelineState::Streaming);
                    }
                    return Ok(Flushed::Done);
                }
                Err(error) => error,
            };
            let import_failure = instance.last_import_failure().map(|failure| failure.kind);
            self.metrics.batch_failed(
                match import_failure {
                    Some(ImportErrorKind::Refused) => FailureCause::Refused,
                    Some(ImportErrorKind::Unavailable) => FailureCause::Unavailable,
                    None => FailureCause::Handler,
                },
                took,
            );
            // A failed instance may hold half-updated guest state (or be poisoned by a trap):
            // the retry always starts from a fresh one.
            *handler = None;
            let first_lsn = events.first().map_or(Lsn::ZERO, |event| event.lsn);
            let last_lsn = events.last().map_or(Lsn::ZERO, |event| event.lsn);
            let failed = |attempts, outage, error| PipelineError::HandlerFailed {
                attempts,
                events: events.len(),
                first_lsn,
                last_lsn,
                outage,
                error,
            };
            match import_failure {
                Some(ImportErrorKind::Refused) => {
                    warn!(
                        pipeline = %config.name, %first_lsn,
                        "the embedder or the sink refused a request of this batch; retrying \
                         cannot help, stopping"
                    );
                    return Err(failed(tries, false, error));
                }
                Some(ImportErrorKind::Unavailable) => {
                    // An outage does not use up the batch's tries; its length is bounded.
                    attempt -= 1;
                    let outage = outage.get_or_insert_with(Outage::begin);
                    if outage.started.elapsed() >= config.retry.outage_limit {
                        return Err(failed(tries, true, error));
                    }
                    outage.tries += 1;
                }
                None => {
                    outage = None;
                    if attempt >= max_attempts {
                        return Err(failed(tries, false, error));
                    }
                }
            }
            // A stop asked for before this try: the operator wants the process gone, not an
            // outage ridden out. The batch stays unconfirmed and is replayed at the next start.
            let Some(shutdown) = shutdown.as_mut() else {
                warn!(pipeline = %config.name, %first_lsn, %error, "the batch failed while stopping");
                return Ok(Flushed::Abandoned);
            };
            let wait = match &outage {
                Some(outage) => {
                    let reason = format!(
                        "the embedder or the sink is unavailable: {}",
                        error.summary()
                    );
                    self.status.set_state(PipelineState::Retrying {
                        reason: reason.clone(),
                    });
                    // The first failure is a warning; the rest of the outage is told by the
                    // progress line, so a long one does not flood the log.
                    if outage.tries == 1 {
                        warn!(
                            pipeline = %config.name, %first_lsn,
                            outage_limit = ?config.retry.outage_limit, %error,
                            "the embedder or the sink is unavailable; retrying the batch until it is back"
                        );
                    } else {
                        debug!(pipeline = %config.name, try_number = tries, %error, "still unavailable");
                    }
                    progress.waiting(
                        &config.name,
                        summary,
                        outage.started.elapsed(),
                        &config.retry,
                        &reason,
                    );
                    config.retry.outage_backoff(outage.tries)
                }
                None => {
                    let wait = config.retry.backoff(attempt);
                    self.status.set_state(PipelineState::Retrying {
                        reason: format!(
                            "handler failed (attempt {attempt} of {max_attempts}): {}",
                            error.summary()
                        ),
                    });
                    warn!(
                        pipeline = %config.name, attempt, max_attempts,
                        %first_lsn, ?wait, %error,
                        "handler failed; retrying the batch on a fresh instance"
                    );
                    wait
                }
            };
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

/// An outage being ridden out: since when, and how many tries failed in it.
struct Outage {
    started: Instant,
    tries: u32,
}

impl Outage {
    fn begin() -> Outage {
        Outage {
            started: Instant::now(),
            tries: 0,
        }
    }
}

/// The next reload request, never when there is no listener.
async fn reload_requested(reloads: &mut Option<ReloadListener>) -> Option<Instant> {
    match reloads {
        Some(listener) => listener.requested().await,
        None => std::future::pending().await,
    }
}

/// The outcome of the reload in progress, never when there is none. Cancel-safe: the load goes
/// on in its task when this future is dropped.
async fn reload_loaded(
    pending: &mut Option<PendingReload>,
) -> (Instant, Result<Option<Reloaded>, ReloadRejected>) {
    let Some(reload) = pending.as_mut() else {
        return std::future::pending().await;
    };
    let loaded = (&mut reload.task)
        .await
        .unwrap_or(Err(ReloadRejected::Panicked));
    let requested = reload.requested;
    *pending = None;
    (requested, loaded)
}

/// Whether the stop request has come, without waiting for it. Once this returns true the
/// future has finished and must not be polled again: every caller returns at once.
fn stop_requested(shutdown: &mut Pin<&mut (impl Future<Output = ()> + Send)>) -> bool {
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    shutdown.as_mut().poll(&mut context).is_ready()
}

enum StreamEnd {
    Finished,
    Lost(SourceError),
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

    fn tick(&mut self, config: &PipelineConfig, summary: &RunSummary, embedder: &dyn Embedder) {
        let (name, slot) = (&config.name, &config.slot);
        let elapsed = self.last.elapsed();
        if elapsed < self.interval {
            return;
        }
        let rate = (summary.events - self.last_events) as f64 / elapsed.as_secs_f64();
        match embedder.cache_stats() {
            Some(cache) => info!(
                pipeline = %name, slot = %slot, events = summary.events, events_per_sec = rate.round(),
                confirmed = %summary.confirmed,
                embed_cache_hit_rate = format_args!("{:.3}", cache.hit_rate()),
                texts_embedded = cache.texts_embedded, "progress"
            ),
            None => info!(
                pipeline = %name, slot = %slot, events = summary.events, events_per_sec = rate.round(),
                confirmed = %summary.confirmed, "progress"
            ),
        }
        self.last = Instant::now();
        self.last_events = summary.events;
    }

    /// The progress line of a pipeline that is waiting for a dependency to come back: what it
    /// waits for, for how long so far, and how long it will.
    fn waiting(
        &mut self,
        name: &str,
        summary: &RunSummary,
        waited: Duration,
        retry: &RetryPolicy,
        reason: &str,
    ) {
        if self.last.elapsed() < self.interval {
            return;
        }
        info!(
            pipeline = %name, events = summary.events, confirmed = %summary.confirmed,
            waited_secs = waited.as_secs(), outage_limit_secs = retry.outage_limit.as_secs(),
            "progress: waiting; {reason}"
        );
        self.last = Instant::now();
        self.last_events = summary.events;
    }
}
