//! The `pgstream:handler/host` interface as the guest sees it, and the [`HostImports`] trait
//! the pipeline implements to give it an embedder and a sink.
//!
//! Every published version of the interface is served by the same [`HostState`]: the WIT
//! values of each version are converted to the crate's own types and go through one
//! implementation, so 0.1.0 and 0.2.0 guests get exactly the same checks and limits. 0.2.0
//! only adds `merge`.
//!
//! The runtime knows neither embedders nor sinks: it converts the guest's WIT values into
//! [`Point`]s and [`PointKey`]s and hands them to whatever `HostImports` the pipeline passed to
//! [`Plugin::instantiate`](super::Plugin::instantiate). Failures of those calls are typed
//! [`ImportError`]s: their message goes back to the guest as a WIT `error` value (the guest
//! decides whether to give up the batch; it never traps), and the instance remembers the worst
//! one of the call, so whoever drives it knows whether retrying may help even when the guest
//! caught the error and went on.

use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;

use super::bindings::pgstream::handler0_1_0 as v0_1;
use super::bindings::pgstream::handler0_2_0 as v0_2;
use super::limits::CallClock;
use super::log_budget::{Admission, LogBudget, report_dropped};
use crate::point::{Point, PointKey};

/// Whether a failed host import may succeed when tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ImportErrorKind {
    /// The embedder or the store could not serve the request (unreachable, timed out,
    /// overloaded): the same call may succeed once it is back.
    Unavailable,
    /// The request was refused (wrong dimension, a bad request, a namespace the pipeline may
    /// not write): the same call fails the same way every time.
    Refused,
}

/// A failed host import: how it failed, and the text the guest gets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ImportError {
    /// Whether repeating the call may help.
    pub kind: ImportErrorKind,
    /// One line, the cause included ("cannot embed: ... connection refused").
    pub message: String,
}

impl ImportError {
    /// An error the caller could not be served for; worth retrying.
    pub fn unavailable(message: impl Into<String>) -> ImportError {
        ImportError {
            kind: ImportErrorKind::Unavailable,
            message: message.into(),
        }
    }

    /// A refusal; retrying cannot help.
    pub fn refused(message: impl Into<String>) -> ImportError {
        ImportError {
            kind: ImportErrorKind::Refused,
            message: message.into(),
        }
    }
}

/// What a handler can do outside its sandbox. Implemented by the pipeline, which wires the
/// embedder and the sink of one pipeline.
///
/// Each method is called while the guest's `handle` call is suspended waiting for it, in the
/// order the guest makes the calls; calls of one instance never overlap. A handler may retry a
/// batch after a failure, so `upsert`, `delete` and `delete_table` must be idempotent. An
/// `Err` is returned to the guest as a WIT `error` with its message, and recorded on the
/// instance (see [`HandlerInstance::last_import_failure`](super::HandlerInstance::last_import_failure)).
#[async_trait]
pub trait HostImports: Send + Sync + 'static {
    /// Embeds texts; returns one vector per text, in the same order.
    async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, ImportError>;
    /// Inserts or replaces points.
    async fn upsert(&self, points: Vec<Point>) -> Result<(), ImportError>;
    /// Writes points whose payloads merge into the stored ones (see
    /// [`Sink::merge`](crate::sink::Sink::merge)).
    async fn merge(&self, points: Vec<Point>) -> Result<(), ImportError>;
    /// Deletes points; missing keys are not an error.
    async fn delete(&self, keys: Vec<PointKey>) -> Result<(), ImportError>;
    /// Deletes every point made from rows of `schema.table`.
    async fn delete_table(&self, schema: String, table: String) -> Result<(), ImportError>;
}

/// The part of a store's data the `host` interface works on.
pub(crate) struct HostState {
    imports: Arc<dyn HostImports>,
    log_target: Arc<str>,
    /// Told when an import starts and ends, so time awaiting the embedder or the sink does not
    /// count against the guest's time limit.
    clock: Arc<CallClock>,
    /// The worst import failure of the current call (a refusal outweighs an outage; the first
    /// of its kind is kept).
    failure: Option<ImportError>,
    /// Shared with the instance's stdout and stderr.
    log_budget: Arc<LogBudget>,
}

impl HostState {
    pub(crate) fn new(
        imports: Arc<dyn HostImports>,
        log_target: Arc<str>,
        clock: Arc<CallClock>,
        log_budget: Arc<LogBudget>,
    ) -> HostState {
        HostState {
            imports,
            log_target,
            clock,
            failure: None,
            log_budget,
        }
    }

    /// Forgets the previous call's failure; called as a call starts.
    pub(crate) fn clear_failure(&mut self) {
        self.failure = None;
    }

    /// The worst import failure since the call started.
    pub(crate) fn failure(&self) -> Option<&ImportError> {
        self.failure.as_ref()
    }

    /// Remembers a failure and returns the message the guest gets.
    fn failed(&mut self, error: ImportError) -> String {
        let message = error.message.clone();
        if self
            .failure
            .as_ref()
            .is_none_or(|known| known.kind < error.kind)
        {
            self.failure = Some(error);
        }
        message
    }

    /// Runs one host import with the guest's clock stopped.
    async fn outside_guest_time<T>(&self, call: impl Future<Output = T>) -> T {
        self.clock.enter_host();
        let result = call.await;
        self.clock.leave_host();
        result
    }
}

fn point_key_v1(key: v0_1::types::PointKey) -> PointKey {
    PointKey {
        schema: key.schema,
        table: key.table,
        key: key.key,
    }
}

fn point_key_v2(key: v0_2::types::PointKey) -> PointKey {
    PointKey {
        schema: key.schema,
        table: key.table,
        key: key.key,
    }
}

fn point_v2(point: v0_2::types::Point) -> Point {
    Point {
        key: point_key_v2(point.key),
        vector: point.vector,
        payload: point.payload,
    }
}

/// Longest `log` message kept whole, in characters; longer ones are cut.
const MAX_LOG_MESSAGE_CHARS: usize = 8 * 1024;

/// Most texts one `embed` call may pass (documented in the WIT).
pub const MAX_EMBED_TEXTS: usize = 100_000;
/// Most text bytes one `embed` call may pass (documented in the WIT).
pub const MAX_EMBED_BYTES: usize = 64 * 1024 * 1024;

/// The imports of every version, on the crate's own types; the `Host` impls below only convert.
/// An `Err` is the message the guest gets.
impl HostState {
    async fn embed_texts(&mut self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, String> {
        let count = texts.len();
        // The guest's memory limit does not bound what embedding costs the host: an empty
        // string is 8 bytes in the guest but kilobytes of tokens and vector here. Refusing
        // oversized calls keeps one plugin from exhausting the process.
        let bytes: usize = texts.iter().map(String::len).sum();
        if count > MAX_EMBED_TEXTS || bytes > MAX_EMBED_BYTES {
            return Err(format!(
                "embed called with {count} texts ({bytes} bytes); at most {MAX_EMBED_TEXTS} texts \
                 and {MAX_EMBED_BYTES} bytes per call"
            ));
        }
        let result = self.outside_guest_time(self.imports.embed(texts)).await;
        match result {
            Ok(vectors) if vectors.len() == count => Ok(vectors),
            // A guest indexes the result by position; a short answer would misalign every
            // vector after the gap, so it is reported instead of passed on.
            Ok(vectors) => Err(self.failed(ImportError::refused(format!(
                "embedder returned {} vectors for {count} texts",
                vectors.len()
            )))),
            Err(error) => Err(self.failed(error)),
        }
    }

    async fn upsert_points(&mut self, points: Vec<Point>) -> Result<(), String> {
        let result = self.outside_guest_time(self.imports.upsert(points)).await;
        result.map_err(|error| self.failed(error))
    }

    async fn merge_points(&mut self, points: Vec<Point>) -> Result<(), String> {
        let result = self.outside_guest_time(self.imports.merge(points)).await;
        result.map_err(|error| self.failed(error))
    }

    async fn delete_keys(&mut self, keys: Vec<PointKey>) -> Result<(), String> {
        let result = self.outside_guest_time(self.imports.delete(keys)).await;
        result.map_err(|error| self.failed(error))
    }

    async fn delete_whole_table(&mut self, schema: String, table: String) -> Result<(), String> {
        let result = self
            .outside_guest_time(self.imports.delete_table(schema, table))
            .await;
        result.map_err(|error| self.failed(error))
    }

    fn log_line(&mut self, level: v0_2::types::LogLevel, message: String) {
        use v0_2::types::LogLevel;
        let plugin = &*self.log_target;
        match self.log_budget.admit() {
            Admission::Drop => return,
            Admission::Log { dropped } => report_dropped(plugin, dropped),
        }
        // One line of the log is not a place for megabytes.
        let message = match message.char_indices().nth(MAX_LOG_MESSAGE_CHARS) {
            Some((cut, _)) => format!("{}... ({} bytes in all)", &message[..cut], message.len()),
            None => message,
        };
        // `tracing` needs the level as a constant, hence one macro call per level.
        match level {
            LogLevel::Trace => tracing::trace!(target: "pgstream::plugin", plugin, "{message}"),
            LogLevel::Debug => tracing::debug!(target: "pgstream::plugin", plugin, "{message}"),
            LogLevel::Info => tracing::info!(target: "pgstream::plugin", plugin, "{message}"),
            LogLevel::Warn => tracing::warn!(target: "pgstream::plugin", plugin, "{message}"),
            LogLevel::Error => tracing::error!(target: "pgstream::plugin", plugin, "{message}"),
        }
    }
}

/// The `types` interfaces have no functions; the linker still asks for their (empty) traits.
impl v0_1::types::Host for HostState {}
impl v0_2::types::Host for HostState {}

fn error_v1(message: String) -> v0_1::types::Error {
    v0_1::types::Error { message }
}

fn error_v2(message: String) -> v0_2::types::Error {
    v0_2::types::Error { message }
}

impl v0_1::host::Host for HostState {
    async fn embed(&mut self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, v0_1::types::Error> {
        self.embed_texts(texts).await.map_err(error_v1)
    }

    async fn upsert(&mut self, points: Vec<v0_1::types::Point>) -> Result<(), v0_1::types::Error> {
        let points = points
            .into_iter()
            .map(|point| Point {
                key: point_key_v1(point.key),
                vector: point.vector,
                payload: point.payload,
            })
            .collect();
        self.upsert_points(points).await.map_err(error_v1)
    }

    async fn delete(&mut self, keys: Vec<v0_1::types::PointKey>) -> Result<(), v0_1::types::Error> {
        let keys = keys.into_iter().map(point_key_v1).collect();
        self.delete_keys(keys).await.map_err(error_v1)
    }

    async fn delete_table(
        &mut self,
        schema: String,
        table: String,
    ) -> Result<(), v0_1::types::Error> {
        self.delete_whole_table(schema, table)
            .await
            .map_err(error_v1)
    }

    async fn log(&mut self, level: v0_1::types::LogLevel, message: String) {
        use v0_1::types::LogLevel as Old;
        use v0_2::types::LogLevel as New;
        let level = match level {
            Old::Trace => New::Trace,
            Old::Debug => New::Debug,
            Old::Info => New::Info,
            Old::Warn => New::Warn,
            Old::Error => New::Error,
        };
        self.log_line(level, message);
    }
}

impl v0_2::host::Host for HostState {
    async fn embed(&mut self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, v0_2::types::Error> {
        self.embed_texts(texts).await.map_err(error_v2)
    }

    async fn upsert(&mut self, points: Vec<v0_2::types::Point>) -> Result<(), v0_2::types::Error> {
        self.upsert_points(points.into_iter().map(point_v2).collect())
            .await
            .map_err(error_v2)
    }

    async fn merge(&mut self, points: Vec<v0_2::types::Point>) -> Result<(), v0_2::types::Error> {
        self.merge_points(points.into_iter().map(point_v2).collect())
            .await
            .map_err(error_v2)
    }

    async fn delete(&mut self, keys: Vec<v0_2::types::PointKey>) -> Result<(), v0_2::types::Error> {
        let keys = keys.into_iter().map(point_key_v2).collect();
        self.delete_keys(keys).await.map_err(error_v2)
    }

    async fn delete_table(
        &mut self,
        schema: String,
        table: String,
    ) -> Result<(), v0_2::types::Error> {
        self.delete_whole_table(schema, table)
            .await
            .map_err(error_v2)
    }

    async fn log(&mut self, level: v0_2::types::LogLevel, message: String) {
        self.log_line(level, message);
    }
}
