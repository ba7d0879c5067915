//! The host side of a handler's imports for one pipeline: `embed` goes to the pipeline's
//! embedder, `upsert`/`delete`/`delete-table` to its sink. This is the only place where the
//! plugin runtime meets embedders and sinks; neither of them knows the other.
//!
//! Each failure is classified here, once, from the embedder's or the sink's own error type:
//! an outage (worth retrying while it lasts) or a refusal (retrying cannot help).

use std::sync::Arc;

use async_trait::async_trait;

use crate::embed::Embedder;
use crate::point::{Point, PointKey};
use crate::runtime::{HostImports, ImportError, ImportErrorKind};
use crate::sink::Sink;

/// Routes a pipeline's handler imports to its embedder and sink.
pub struct PipelineImports {
    embedder: Arc<dyn Embedder>,
    sink: Arc<dyn Sink>,
}

impl PipelineImports {
    /// Wires an embedder and a sink.
    pub fn new(embedder: Arc<dyn Embedder>, sink: Arc<dyn Sink>) -> PipelineImports {
        PipelineImports { embedder, sink }
    }
}

/// The typed import error for an embedder's or a sink's failure. The guest only gets text, and
/// the cause is usually the useful part ("cannot embed: ... connection refused").
fn import_error(error: &dyn std::error::Error, retryable: bool) -> ImportError {
    ImportError {
        kind: if retryable {
            ImportErrorKind::Unavailable
        } else {
            ImportErrorKind::Refused
        },
        message: crate::error_chain::one_line(error),
    }
}

#[async_trait]
impl HostImports for PipelineImports {
    async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, ImportError> {
        self.embedder
            .embed(&texts)
            .await
            .map_err(|error| import_error(&error, error.is_retryable()))
    }

    async fn upsert(&self, points: Vec<Point>) -> Result<(), ImportError> {
        self.sink
            .upsert(&points)
            .await
            .map_err(|error| import_error(&error, error.is_retryable()))
    }

    async fn delete(&self, keys: Vec<PointKey>) -> Result<(), ImportError> {
        self.sink
            .delete(&keys)
            .await
            .map_err(|error| import_error(&error, error.is_retryable()))
    }

    async fn delete_table(&self, schema: String, table: String) -> Result<(), ImportError> {
        self.sink
            .delete_table(&schema, &table)
            .await
            .map_err(|error| import_error(&error, error.is_retryable()))
    }
}
