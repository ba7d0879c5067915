//! The host side of a handler's imports for one pipeline: `embed` goes to the pipeline's
//! embedder, `upsert`/`delete`/`delete-table` to its sink. This is the only place where the
//! plugin runtime meets embedders and sinks; neither of them knows the other.

use std::sync::Arc;

use async_trait::async_trait;

use crate::embed::Embedder;
use crate::point::{Point, PointKey};
use crate::runtime::HostImports;
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

/// The error and its chain of causes on one line: the guest only gets text, and the cause is
/// usually the useful part ("vector store rejected the write: ... dimension mismatch").
fn describe(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[async_trait]
impl HostImports for PipelineImports {
    async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, String> {
        self.embedder
            .embed(&texts)
            .await
            .map_err(|error| describe(&error))
    }

    async fn upsert(&self, points: Vec<Point>) -> Result<(), String> {
        self.sink
            .upsert(&points)
            .await
            .map_err(|error| describe(&error))
    }

    async fn delete(&self, keys: Vec<PointKey>) -> Result<(), String> {
        self.sink
            .delete(&keys)
            .await
            .map_err(|error| describe(&error))
    }

    async fn delete_table(&self, schema: String, table: String) -> Result<(), String> {
        self.sink
            .delete_table(&schema, &table)
            .await
            .map_err(|error| describe(&error))
    }
}
