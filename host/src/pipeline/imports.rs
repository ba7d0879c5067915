//! The host side of a handler's imports for one pipeline: `embed` goes to the pipeline's
//! embedder, `upsert`/`delete`/`delete-table` to its sink. This is the only place where the
//! plugin runtime meets embedders and sinks; neither of them knows the other.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use crate::embed::Embedder;
use crate::point::{Point, PointKey};
use crate::runtime::HostImports;
use crate::sink::Sink;

/// What the embedder's or the sink's failures during one handler call say about retrying it.
///
/// The guest only ever sees an import's error as text, so the pipeline learns here whether a
/// failed call is worth repeating: a store or model server that is down comes back, a refused
/// write (wrong dimension, bad request, wrong key) fails the same way every time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ImportFailure {
    /// At least one import failed in a way that may go away (unavailable, timed out).
    Transient,
    /// At least one import was refused; repeating the call cannot help.
    Permanent,
}

/// An import that failed during a handler call: how, and the text the guest got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedImport {
    /// Whether repeating the call may help.
    pub kind: ImportFailure,
    /// The error as the guest saw it.
    pub message: String,
}

/// Routes a pipeline's handler imports to its embedder and sink.
pub struct PipelineImports {
    embedder: Arc<dyn Embedder>,
    sink: Arc<dyn Sink>,
    /// The worst failure since [`take_failure`](Self::take_failure) was last called (the
    /// first of that kind).
    failure: Mutex<Option<FailedImport>>,
}

impl PipelineImports {
    /// Wires an embedder and a sink.
    pub fn new(embedder: Arc<dyn Embedder>, sink: Arc<dyn Sink>) -> PipelineImports {
        PipelineImports {
            embedder,
            sink,
            failure: Mutex::new(None),
        }
    }

    /// The worst import failure since the last call (a refusal outweighs an outage), and
    /// forgets it. The pipeline calls it before and after each handler call: a call during
    /// which an import failed is a failed call, even if the guest caught the error and
    /// returned `ok`, since a write it asked for did not happen.
    pub fn take_failure(&self) -> Option<FailedImport> {
        self.failure
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
    }

    /// Remembers a failure and turns it into the text the guest gets.
    fn failed(&self, error: &dyn std::error::Error, retryable: bool) -> String {
        let failure = if retryable {
            ImportFailure::Transient
        } else {
            ImportFailure::Permanent
        };
        // The guest only gets text, and the cause is usually the useful part ("cannot embed:
        // ... connection refused").
        let message = crate::error_chain::one_line(error);
        let mut worst = self
            .failure
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if worst.as_ref().is_none_or(|known| known.kind < failure) {
            *worst = Some(FailedImport {
                kind: failure,
                message: message.clone(),
            });
        }
        message
    }
}

#[async_trait]
impl HostImports for PipelineImports {
    async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, String> {
        self.embedder
            .embed(&texts)
            .await
            .map_err(|error| self.failed(&error, error.is_retryable()))
    }

    async fn upsert(&self, points: Vec<Point>) -> Result<(), String> {
        self.sink
            .upsert(&points)
            .await
            .map_err(|error| self.failed(&error, error.is_retryable()))
    }

    async fn delete(&self, keys: Vec<PointKey>) -> Result<(), String> {
        self.sink
            .delete(&keys)
            .await
            .map_err(|error| self.failed(&error, error.is_retryable()))
    }

    async fn delete_table(&self, schema: String, table: String) -> Result<(), String> {
        self.sink
            .delete_table(&schema, &table)
            .await
            .map_err(|error| self.failed(&error, error.is_retryable()))
    }
}
