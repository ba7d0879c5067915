//! The JSON-lines sink: every write is appended to a file as one JSON object per line, in the
//! order the handler made it. It stores nothing queryable; it exists so a pipeline can be
//! inspected (what exactly did my handler write?) and tested on servers without pgvector.
//!
//! Line shapes: `{"op":"upsert","schema":..,"table":..,"key":[..],"vector":[..]|null,"payload":{..}}`,
//! `{"op":"merge","schema":..,"table":..,"key":[..],"vector":[..]|null,"payload":{..}}` (the
//! points of one call folded per key), `{"op":"delete","schema":..,"table":..,"key":[..]}`,
//! `{"op":"delete_table","schema":..,"table":..}`.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Mutex;

use async_trait::async_trait;
use serde_json::{Value as Json, json};

use super::merge_fold::fold_merges;
use crate::point::{Point, PointKey};
use crate::sink::{Sink, SinkError};

/// Appends writes to a file as JSON lines.
pub struct JsonLinesSink {
    file: Mutex<File>,
}

impl JsonLinesSink {
    /// Opens `path` for appending, creating it if missing.
    pub fn open(path: &Path) -> Result<JsonLinesSink, SinkError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|error| {
                SinkError::Rejected(format!(
                    "the JSON-lines sink cannot open {} for appending: {error}",
                    path.display()
                ))
            })?;
        Ok(JsonLinesSink {
            file: Mutex::new(file),
        })
    }

    /// Writes the lines and syncs, so a write that returned `Ok` survives a crash.
    fn append(&self, lines: impl Iterator<Item = Json>) -> Result<(), SinkError> {
        let file = self.file.lock().map_err(|_| {
            SinkError::Rejected("the JSON-lines sink's file lock was poisoned".into())
        })?;
        let mut writer = BufWriter::new(&*file);
        for line in lines {
            serde_json::to_writer(&mut writer, &line)
                .map_err(|error| SinkError::Unavailable(Box::new(error)))?;
            writer
                .write_all(b"\n")
                .map_err(|error| SinkError::Unavailable(Box::new(error)))?;
        }
        writer
            .flush()
            .map_err(|error| SinkError::Unavailable(Box::new(error)))?;
        drop(writer);
        file.sync_data()
            .map_err(|error| SinkError::Unavailable(Box::new(error)))
    }
}

fn key_fields(key: &PointKey) -> (String, String, Json) {
    (key.schema.clone(), key.table.clone(), json!(key.key))
}

#[async_trait]
impl Sink for JsonLinesSink {
    async fn prepare(&self, _dimensions: usize) -> Result<(), SinkError> {
        Ok(())
    }

    async fn merge(&self, points: &[Point]) -> Result<(), SinkError> {
        let lines = fold_merges(points)?.into_iter().map(|merged| {
            let (schema, table, key) = key_fields(merged.key);
            json!({
                "op": "merge",
                "schema": schema,
                "table": table,
                "key": key,
                "vector": merged.vector,
                "payload": Json::Object(merged.payload),
            })
        });
        self.append(lines)
    }

    async fn upsert(&self, points: &[Point]) -> Result<(), SinkError> {
        let mut lines = Vec::with_capacity(points.len());
        for point in points {
            let payload: Json = serde_json::from_str(&point.payload).map_err(|error| {
                SinkError::Rejected(format!(
                    "the JSON-lines sink got a point payload that is not valid JSON: {error}"
                ))
            })?;
            let (schema, table, key) = key_fields(&point.key);
            lines.push(json!({
                "op": "upsert", "schema": schema, "table": table, "key": key,
                "vector": point.vector, "payload": payload,
            }));
        }
        self.append(lines.into_iter())
    }

    async fn delete(&self, keys: &[PointKey]) -> Result<(), SinkError> {
        self.append(keys.iter().map(|key| {
            let (schema, table, key) = key_fields(key);
            json!({"op": "delete", "schema": schema, "table": table, "key": key})
        }))
    }

    async fn delete_table(&self, schema: &str, table: &str) -> Result<(), SinkError> {
        self.append(std::iter::once(
            json!({"op": "delete_table", "schema": schema, "table": table}),
        ))
    }
}
