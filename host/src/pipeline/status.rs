//! What a running pipeline is doing, readable from outside it: its state, the last position it
//! confirmed and its last error. The pipeline writes it as it goes; the supervisor adds the
//! states it decides (restarting, failed, stopped) and `status` reads it.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use crate::embed::{EmbedCacheStats, Embedder};
use crate::lsn::Lsn;
use crate::replication::SlotWal;
use crate::runtime::PluginDigest;

/// The phase a pipeline is in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PipelineState {
    /// Loading its plugin, checking and preparing its source and sink.
    Starting,
    /// Another host runs it; this one takes over when that one's lease ends.
    Standby,
    /// Receiving changes and handing them to its handler.
    Streaming,
    /// A batch or a connection failed and is being retried; the reason says why.
    Retrying {
        /// What failed, one line.
        reason: String,
    },
    /// Stopped after an error and waiting to be started again (by its supervisor).
    Restarting {
        /// What failed, one line.
        reason: String,
    },
    /// Stopped for good after an error retrying cannot fix.
    Failed {
        /// What failed, one line.
        reason: String,
    },
    /// Stopped cleanly (a stop request or `stop_at` reached).
    Stopped,
}

impl PipelineState {
    /// Every state's [`name`](PipelineState::name), for displays that list them all (the
    /// metrics give each state a series, 0 or 1).
    pub const NAMES: [&'static str; 7] = [
        "starting",
        "standby",
        "streaming",
        "retrying",
        "restarting",
        "failed",
        "stopped",
    ];

    /// The state's name, one word: one of [`NAMES`](PipelineState::NAMES).
    pub fn name(&self) -> &'static str {
        match self {
            PipelineState::Starting => "starting",
            PipelineState::Standby => "standby",
            PipelineState::Streaming => "streaming",
            PipelineState::Retrying { .. } => "retrying",
            PipelineState::Restarting { .. } => "restarting",
            PipelineState::Failed { .. } => "failed",
            PipelineState::Stopped => "stopped",
        }
    }

    /// Why the pipeline is not streaming, if it is retrying or has failed.
    pub fn reason(&self) -> Option<&str> {
        match self {
            PipelineState::Retrying { reason }
            | PipelineState::Restarting { reason }
            | PipelineState::Failed { reason } => Some(reason),
            PipelineState::Starting
            | PipelineState::Standby
            | PipelineState::Streaming
            | PipelineState::Stopped => None,
        }
    }
}

impl fmt::Display for PipelineState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.reason() {
            Some(reason) => write!(f, "{}: {reason}", self.name()),
            None => f.write_str(self.name()),
        }
    }
}

/// A snapshot of one pipeline's status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineStatus {
    /// The pipeline's name.
    pub name: String,
    /// What it is doing.
    pub state: PipelineState,
    /// The last position confirmed to the source.
    pub confirmed: Lsn,
    /// Events handled since the process started it.
    pub events: u64,
    /// The last error, kept after the pipeline recovered from it.
    pub last_error: Option<String>,
    /// When `state` last changed.
    pub since: SystemTime,
    /// The last reading of the slot's lag and hold on WAL, while streaming from Postgres.
    pub slot: Option<SlotWal>,
    /// The version of the plugin that handles the changes, once one is running.
    pub plugin: Option<PluginDigest>,
    /// When the handler last took a batch of changes (their commits are confirmed with it).
    pub last_change: Option<SystemTime>,
}

/// A shared, cheap-to-clone handle on one pipeline's status.
#[derive(Clone)]
pub struct StatusHandle {
    inner: Arc<Mutex<PipelineStatus>>,
    /// The running embedder, asked for its cache's figures when they are read.
    embedder: Arc<Mutex<Option<Arc<dyn Embedder>>>>,
}

impl fmt::Debug for StatusHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StatusHandle")
            .field("status", &*self.lock())
            .finish_non_exhaustive()
    }
}

impl StatusHandle {
    /// A pipeline that is starting.
    pub fn new(name: &str) -> StatusHandle {
        StatusHandle {
            inner: Arc::new(Mutex::new(PipelineStatus {
                name: name.to_owned(),
                state: PipelineState::Starting,
                confirmed: Lsn::ZERO,
                events: 0,
                last_error: None,
                since: SystemTime::now(),
                slot: None,
                plugin: None,
                last_change: None,
            })),
            embedder: Arc::new(Mutex::new(None)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, PipelineStatus> {
        // A panic elsewhere while holding the lock leaves a status that is still readable.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A copy of the current status.
    pub fn snapshot(&self) -> PipelineStatus {
        self.lock().clone()
    }

    /// Moves to `state`; a state with a reason also becomes the last error.
    pub fn set_state(&self, state: PipelineState) {
        let mut status = self.lock();
        if status.state == state {
            return;
        }
        if let Some(reason) = state.reason() {
            status.last_error = Some(reason.to_owned());
        }
        status.state = state;
        status.since = SystemTime::now();
    }

    /// Records a position confirmed to the source.
    pub(crate) fn set_confirmed(&self, confirmed: Lsn) {
        let mut status = self.lock();
        status.confirmed = status.confirmed.max(confirmed);
    }

    /// Records a reading of the pipeline's replication slot.
    pub(crate) fn set_slot(&self, slot: SlotWal) {
        self.lock().slot = Some(slot);
    }

    /// Records the version of the plugin now handling the changes.
    pub(crate) fn set_plugin(&self, plugin: PluginDigest) {
        self.lock().plugin = Some(plugin);
    }

    /// Makes `embedder` the one whose cache figures [`StatusHandle::embed_cache_stats`] reads.
    pub(crate) fn set_embedder(&self, embedder: Arc<dyn Embedder>) {
        *self.embedder.lock().unwrap_or_else(PoisonError::into_inner) = Some(embedder);
    }

    /// The running embedder's cache figures, if it has a cache. They count from the pipeline's
    /// last (re)start.
    pub fn embed_cache_stats(&self) -> Option<EmbedCacheStats> {
        let embedder = self
            .embedder
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        embedder?.cache_stats()
    }

    /// Counts events handled by a successful handler call.
    pub(crate) fn add_events(&self, events: u64) {
        let mut status = self.lock();
        status.events += events;
        status.last_change = Some(SystemTime::now());
    }
}
