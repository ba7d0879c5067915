//! The host side of a handler's imports for one pipeline: `embed` goes to the pipeline's
//! embedder, `upsert`/`merge`/`delete`/`delete-table` to its sink. This is the only place where the
//! plugin runtime meets embedders and sinks; neither of them knows the other.
//!
//! Each failure is classified here, once, from the embedder's or the sink's own error type:
//! an outage (worth retrying while it lasts) or a refusal (retrying cannot help).
//!
//! This is also where a handler's reach ends. Its sink namespace (table, collection, file) is
//! fixed by the pipeline, so no import can name another; within it, a handler may write only
//! points of the tables its pipeline watches: a write keyed to any other table (another
//! tenant's, or one made up) is refused, so one pipeline's handler cannot overwrite or delete
//! points that another pipeline owns in a shared store.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;

use crate::embed::Embedder;
use crate::metrics::PipelineMetrics;
use crate::point::{Point, PointKey};
use crate::replication::TableName;
use crate::runtime::{HostImports, ImportError, ImportErrorKind};
use crate::sink::Sink;

/// Routes a pipeline's handler imports to its embedder and sink.
pub struct PipelineImports {
    embedder: Arc<dyn Embedder>,
    sink: Arc<dyn Sink>,
    /// The (schema, table) pairs whose points the handler may write.
    tables: HashSet<(String, String)>,
    metrics: PipelineMetrics,
}

impl PipelineImports {
    /// Wires an embedder and a sink for a handler that may write points of `tables` only.
    pub fn new(
        embedder: Arc<dyn Embedder>,
        sink: Arc<dyn Sink>,
        tables: &[TableName],
    ) -> PipelineImports {
        let tables = tables
            .iter()
            .map(|table| (table.schema.clone(), table.name.clone()))
            .collect();
        PipelineImports {
            embedder,
            sink,
            tables,
            metrics: PipelineMetrics::default(),
        }
    }

    /// Counts embed calls and sink writes into `metrics`.
    pub fn with_metrics(mut self, metrics: PipelineMetrics) -> PipelineImports {
        self.metrics = metrics;
        self
    }

    /// Refuses a write for a table the pipeline does not watch.
    fn check_table(&self, schema: &str, table: &str) -> Result<(), ImportError> {
        if self.tables.contains(&(schema.to_owned(), table.to_owned())) {
            return Ok(());
        }
        let mut watched: Vec<String> = self
            .tables
            .iter()
            .map(|(schema, table)| format!("{schema}.{table}"))
            .collect();
        watched.sort();
        Err(ImportError::refused(format!(
            "the handler may write points of its pipeline's tables only ({}); it asked to \
             write points of {schema}.{table}",
            watched.join(", ")
        )))
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
        let started = Instant::now();
        let vectors = self
            .embedder
            .embed(&texts)
            .await
            .map_err(|error| import_error(&error, error.is_retryable()))?;
        self.metrics.embedded(texts.len(), started.elapsed());
        Ok(vectors)
    }

    async fn upsert(&self, points: Vec<Point>) -> Result<(), ImportError> {
        for point in &points {
            self.check_table(&point.key.schema, &point.key.table)?;
        }
        let started = Instant::now();
        self.sink
            .upsert(&points)
            .await
            .map_err(|error| import_error(&error, error.is_retryable()))?;
        self.metrics.upserted(points.len(), started.elapsed());
        Ok(())
    }

    async fn merge(&self, points: Vec<Point>) -> Result<(), ImportError> {
        for point in &points {
            self.check_table(&point.key.schema, &point.key.table)?;
        }
        let started = Instant::now();
        self.sink
            .merge(&points)
            .await
            .map_err(|error| import_error(&error, error.is_retryable()))?;
        self.metrics.merged(points.len(), started.elapsed());
        Ok(())
    }

    async fn delete(&self, keys: Vec<PointKey>) -> Result<(), ImportError> {
        for key in &keys {
            self.check_table(&key.schema, &key.table)?;
        }
        let started = Instant::now();
        self.sink
            .delete(&keys)
            .await
            .map_err(|error| import_error(&error, error.is_retryable()))?;
        self.metrics.deleted(keys.len(), started.elapsed());
        Ok(())
    }

    async fn delete_table(&self, schema: String, table: String) -> Result<(), ImportError> {
        self.check_table(&schema, &table)?;
        let started = Instant::now();
        self.sink
            .delete_table(&schema, &table)
            .await
            .map_err(|error| import_error(&error, error.is_retryable()))?;
        self.metrics.deleted(0, started.elapsed());
        Ok(())
    }
}
