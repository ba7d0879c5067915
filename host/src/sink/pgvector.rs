//! The pgvector sink: points go into a Postgres table with a `vector(N)` column and an HNSW
//! cosine index, through a connection pool of its own (never the replication connection).
//!
//! Table layout (created when missing):
//!
//! ```sql
//! CREATE TABLE <collection> (
//!     source_schema text   NOT NULL,  -- schema of the row the point was made from
//!     source_table  text   NOT NULL,  -- its table
//!     source_key    text[] NOT NULL,  -- its key column values as text, in key order
//!     embedding     vector(N) NOT NULL,
//!     payload       jsonb  NOT NULL,
//!     updated_at    timestamptz NOT NULL DEFAULT now(),
//!     PRIMARY KEY (source_schema, source_table, source_key)
//! );
//! ```
//!
//! Every write is one statement over arrays (`unnest`), so a batch costs one round trip and is
//! atomic, and replaying it leaves the same rows.

use std::collections::HashMap;

use async_trait::async_trait;
use deadpool_postgres::Pool;
use pgvector::Vector;
use postgres_protocol::escape::{escape_identifier, escape_literal};
use tokio_postgres::types::ToSql;

use super::merge_fold::{MergedPoint, fold_merges};
use crate::point::{Point, PointKey};
use crate::sink::{Sink, SinkError};

/// Writes points to a pgvector table.
pub struct PgVectorSink {
    pool: Pool,
    schema: String,
    table: String,
    /// `"schema"."table"`, quoted once.
    qualified: String,
}

impl PgVectorSink {
    /// A sink writing to `schema.table` through `pool`. Nothing is touched until
    /// [`Sink::prepare`].
    pub fn new(pool: Pool, schema: &str, table: &str) -> PgVectorSink {
        PgVectorSink {
            pool,
            schema: schema.to_owned(),
            table: table.to_owned(),
            qualified: format!("{}.{}", escape_identifier(schema), escape_identifier(table)),
        }
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, SinkError> {
        self.pool
            .get()
            .await
            .map_err(|error| SinkError::Unavailable(Box::new(error)))
    }

    /// Inserts or updates rows with their vectors; `payload` says what happens to the payload
    /// of a row that exists.
    async fn write_with_vectors<P: ToSql + Sync>(
        &self,
        transaction: &tokio_postgres::Transaction<'_>,
        columns: &RowColumns<'_, P>,
        vectors: &[Vector],
        payload: PayloadWrite,
    ) -> Result<(), SinkError> {
        if vectors.is_empty() {
            return Ok(());
        }
        let statement = format!(
            "INSERT INTO {table} AS t (source_schema, source_table, source_key, embedding, payload)
             SELECT s, tb, {key_k}, e, p::jsonb
             FROM unnest($1::text[], $2::text[], $3::text[], $4::vector[], $5::text[])
                  AS x(s, tb, k, e, p)
             ON CONFLICT (source_schema, source_table, source_key) DO UPDATE
             SET embedding = EXCLUDED.embedding, payload = {new_payload}, updated_at = now()",
            table = self.qualified,
            key_k = key_array("k"),
            new_payload = payload.sql("EXCLUDED.payload"),
        );
        transaction
            .execute(
                &statement,
                &[
                    &columns.schemas as &(dyn ToSql + Sync),
                    &columns.tables,
                    &columns.keys,
                    &vectors,
                    &columns.payloads,
                ],
            )
            .await
            .map_err(classify)?;
        Ok(())
    }

    /// Writes the payloads of existing rows, keeping their vectors; rows that do not exist are
    /// skipped, with a warning naming `what` was skipped.
    async fn write_payloads<P: ToSql + Sync>(
        &self,
        transaction: &tokio_postgres::Transaction<'_>,
        columns: &RowColumns<'_, P>,
        payload: PayloadWrite,
    ) -> Result<(), SinkError> {
        let count = columns.payloads.len() as u64;
        if count == 0 {
            return Ok(());
        }
        let statement = format!(
            "UPDATE {table} AS t SET payload = {new_payload}, updated_at = now()
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS x(s, tb, k, p)
             WHERE t.source_schema = x.s AND t.source_table = x.tb
               AND t.source_key = {key_x_k}",
            table = self.qualified,
            key_x_k = key_array("x.k"),
            new_payload = payload.sql("x.p::jsonb"),
        );
        let updated = transaction
            .execute(
                &statement,
                &[
                    &columns.schemas as &(dyn ToSql + Sync),
                    &columns.tables,
                    &columns.keys,
                    &columns.payloads,
                ],
            )
            .await
            .map_err(classify)?;
        if updated != count {
            // Typically a row that existed before the slot (not reached by the backfill yet,
            // or with --backfill skip) whose update did not resend its TOASTed text: there is
            // no vector to keep and none to make, and stopping the pipeline over it would help
            // nobody.
            tracing::warn!(
                table = %self.qualified,
                skipped = count - updated,
                "{} for points that have no stored vector were skipped; those rows get a point \
                 when their embedded text next changes",
                match payload {
                    PayloadWrite::Replace => "payload-only upserts",
                    PayloadWrite::Merge => "payload merges",
                }
            );
        }
        Ok(())
    }
}

/// What a write does to the payload of a row that exists.
#[derive(Debug, Clone, Copy)]
enum PayloadWrite {
    /// `upsert`: the new payload replaces it.
    Replace,
    /// `merge`: jsonb `||`, the new keys replace or join the stored ones.
    Merge,
}

impl PayloadWrite {
    /// The SQL of the payload after the write, given the SQL of the new one.
    fn sql(self, new: &str) -> String {
        match self {
            PayloadWrite::Replace => new.to_owned(),
            PayloadWrite::Merge => format!("t.payload || {new}"),
        }
    }
}

/// One result of [`PgVectorSink::search`].
#[derive(Debug, Clone, PartialEq)]
pub struct SearchHit {
    /// Cosine similarity to the query, 1 for the same direction.
    pub similarity: f64,
    /// The point's key.
    pub key: PointKey,
    /// The point's payload.
    pub payload: serde_json::Value,
}

impl PgVectorSink {
    /// The `limit` points nearest to `vector` by cosine distance (served by the HNSW index).
    pub async fn search(
        client: &tokio_postgres::Client,
        schema: &str,
        table: &str,
        vector: Vec<f32>,
        limit: i64,
    ) -> Result<Vec<SearchHit>, SinkError> {
        let statement = format!(
            "SELECT source_schema, source_table, source_key, payload,
                    1 - (embedding <=> $1) AS similarity
             FROM {}.{} ORDER BY embedding <=> $1 LIMIT $2",
            escape_identifier(schema),
            escape_identifier(table)
        );
        let rows = client
            .query(&statement, &[&Vector::from(vector), &limit])
            .await
            .map_err(classify)?;
        Ok(rows
            .iter()
            .map(|row| SearchHit {
                similarity: row.get(4),
                key: PointKey {
                    schema: row.get(0),
                    table: row.get(1),
                    key: row.get(2),
                },
                payload: row.get(3),
            })
            .collect())
    }
}

/// The text columns of a batch of points, as arrays for `unnest`.
struct RowColumns<'a, P> {
    schemas: Vec<&'a str>,
    tables: Vec<&'a str>,
    /// Each key as a JSON array of strings: Postgres cannot `unnest` an array of arrays of
    /// different lengths, so keys travel as JSON text and become `text[]` in SQL.
    keys: Vec<String>,
    payloads: Vec<P>,
}

impl<'a> RowColumns<'a, &'a str> {
    fn of_points(points: &[&'a Point]) -> RowColumns<'a, &'a str> {
        RowColumns {
            schemas: points.iter().map(|p| p.key.schema.as_str()).collect(),
            tables: points.iter().map(|p| p.key.table.as_str()).collect(),
            keys: points.iter().map(|p| key_json(&p.key)).collect(),
            payloads: points.iter().map(|p| p.payload.as_str()).collect(),
        }
    }
}

impl<'a> RowColumns<'a, String> {
    /// Folded merges; the payloads are their merged objects.
    fn of_merges(points: &[&MergedPoint<'a>]) -> RowColumns<'a, String> {
        RowColumns {
            schemas: points.iter().map(|p| p.key.schema.as_str()).collect(),
            tables: points.iter().map(|p| p.key.table.as_str()).collect(),
            keys: points.iter().map(|p| key_json(p.key)).collect(),
            payloads: points
                .iter()
                .map(|p| serde_json::Value::Object(p.payload.clone()).to_string())
                .collect(),
        }
    }
}

/// SQL turning a key sent as a JSON array of strings (see [`RowColumns::keys`]) back into
/// the `text[]` stored in `source_key`, elements in their original order.
fn key_array(json_column: &str) -> String {
    format!(
        "ARRAY(SELECT part FROM jsonb_array_elements_text({json_column}::jsonb) \
         WITH ORDINALITY AS parts(part, position) ORDER BY position)"
    )
}

fn key_json(key: &PointKey) -> String {
    serde_json::Value::from(key.key.clone()).to_string()
}

/// Folds a batch so each key appears once, as its last write. `INSERT .. ON CONFLICT` cannot
/// touch one row twice in a statement, and only the last state of a point matters. A
/// payload-only write that follows a write with a vector in the same batch keeps that vector.
fn last_write_per_key(points: &[Point]) -> Vec<Point> {
    let mut position: HashMap<&PointKey, usize> = HashMap::with_capacity(points.len());
    let mut folded: Vec<Point> = Vec::with_capacity(points.len());
    for point in points {
        match position.get(&point.key) {
            Some(&index) => {
                let earlier_vector = folded[index].vector.take();
                folded[index] = point.clone();
                if folded[index].vector.is_none() {
                    folded[index].vector = earlier_vector;
                }
            }
            None => {
                position.insert(&point.key, folded.len());
                folded.push(point.clone());
            }
        }
    }
    folded
}

/// Sorts a Postgres error into retryable (connection trouble, server shutting down) or not.
fn classify(error: tokio_postgres::Error) -> SinkError {
    let retryable = match error.code() {
        Some(code) => {
            let code = code.code();
            code.starts_with("08") || code.starts_with("57P") || code == "40001" || code == "40P01"
        }
        None => true,
    };
    if retryable {
        SinkError::Unavailable(Box::new(error))
    } else {
        let message = match error.as_db_error() {
            Some(db) => format!(
                "the pgvector sink database refused the statement: {} (SQLSTATE {})",
                db.message(),
                db.code().code()
            ),
            None => format!("the pgvector sink failed a statement: {error}"),
        };
        SinkError::Rejected(message)
    }
}

#[async_trait]
impl Sink for PgVectorSink {
    async fn prepare(&self, dimensions: usize) -> Result<(), SinkError> {
        let client = self.client().await?;
        client
            .batch_execute("CREATE EXTENSION IF NOT EXISTS vector")
            .await
            .map_err(|error| {
                let reason = match error.as_db_error() {
                    Some(db) => db.message().to_owned(),
                    None => error.to_string(),
                };
                SinkError::Rejected(format!(
                    "the pgvector extension is not available in the sink database ({reason}); \
                     install pgvector on that server or run CREATE EXTENSION vector as a superuser"
                ))
            })?;
        let existing = client
            .query_opt(
                "SELECT format_type(a.atttypid, a.atttypmod)
                 FROM pg_attribute a
                 WHERE a.attrelid = to_regclass($1) AND a.attname = 'embedding' AND NOT a.attisdropped",
                &[&self.qualified],
            )
            .await
            .map_err(classify)?;
        let wanted = format!("vector({dimensions})");
        match existing {
            Some(row) => {
                let found: String = row.get(0);
                if found != wanted {
                    return Err(SinkError::Rejected(format!(
                        "{} already exists with embedding column {found}, but the embedder makes \
                         {wanted}; use another --collection or drop the table",
                        self.qualified
                    )));
                }
            }
            None => {
                let index = escape_identifier(&format!("{}_embedding_hnsw", self.table));
                let statement = format!(
                    "CREATE SCHEMA IF NOT EXISTS {schema};
                     CREATE TABLE IF NOT EXISTS {table} (
                         source_schema text NOT NULL,
                         source_table text NOT NULL,
                         source_key text[] NOT NULL,
                         embedding {wanted} NOT NULL,
                         payload jsonb NOT NULL,
                         updated_at timestamptz NOT NULL DEFAULT now(),
                         PRIMARY KEY (source_schema, source_table, source_key)
                     );
                     CREATE INDEX IF NOT EXISTS {index} ON {table}
                         USING hnsw (embedding vector_cosine_ops);
                     COMMENT ON TABLE {table} IS {comment};",
                    schema = escape_identifier(&self.schema),
                    table = self.qualified,
                    comment = escape_literal("vectors written by pgstream-host"),
                );
                client.batch_execute(&statement).await.map_err(classify)?;
            }
        }
        Ok(())
    }

    async fn upsert(&self, points: &[Point]) -> Result<(), SinkError> {
        if points.is_empty() {
            return Ok(());
        }
        let folded = last_write_per_key(points);
        let (with_vector, payload_only): (Vec<&Point>, Vec<&Point>) =
            folded.iter().partition(|point| point.vector.is_some());
        let vectors: Vec<Vector> = with_vector
            .iter()
            .map(|point| Vector::from(point.vector.clone().unwrap_or_default()))
            .collect();
        let mut client = self.client().await?;
        // Both statements run in one transaction so a batch is stored whole or not at all.
        let transaction = client.transaction().await.map_err(classify)?;
        let replace = PayloadWrite::Replace;
        self.write_with_vectors(
            &transaction,
            &RowColumns::of_points(&with_vector),
            &vectors,
            replace,
        )
        .await?;
        self.write_payloads(&transaction, &RowColumns::of_points(&payload_only), replace)
            .await?;
        transaction.commit().await.map_err(classify)
    }

    async fn merge(&self, points: &[Point]) -> Result<(), SinkError> {
        if points.is_empty() {
            return Ok(());
        }
        let merged = fold_merges(points)?;
        let (with_vector, payload_only): (Vec<&MergedPoint<'_>>, Vec<&MergedPoint<'_>>) =
            merged.iter().partition(|point| point.vector.is_some());
        let vectors: Vec<Vector> = with_vector
            .iter()
            .map(|point| Vector::from(point.vector.unwrap_or_default().to_vec()))
            .collect();
        let mut client = self.client().await?;
        let transaction = client.transaction().await.map_err(classify)?;
        let merge = PayloadWrite::Merge;
        self.write_with_vectors(
            &transaction,
            &RowColumns::of_merges(&with_vector),
            &vectors,
            merge,
        )
        .await?;
        self.write_payloads(&transaction, &RowColumns::of_merges(&payload_only), merge)
            .await?;
        transaction.commit().await.map_err(classify)
    }

    async fn delete(&self, keys: &[PointKey]) -> Result<(), SinkError> {
        if keys.is_empty() {
            return Ok(());
        }
        let client = self.client().await?;
        let schemas: Vec<&str> = keys.iter().map(|k| k.schema.as_str()).collect();
        let tables: Vec<&str> = keys.iter().map(|k| k.table.as_str()).collect();
        let key_texts: Vec<String> = keys.iter().map(key_json).collect();
        let statement = format!(
            "DELETE FROM {table} AS t
             USING unnest($1::text[], $2::text[], $3::text[]) AS x(s, tb, k)
             WHERE t.source_schema = x.s AND t.source_table = x.tb
               AND t.source_key = {key_x_k}",
            table = self.qualified,
            key_x_k = key_array("x.k")
        );
        client
            .execute(
                &statement,
                &[&schemas as &(dyn ToSql + Sync), &tables, &key_texts],
            )
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn delete_table(&self, schema: &str, table: &str) -> Result<(), SinkError> {
        let client = self.client().await?;
        let statement = format!(
            "DELETE FROM {} WHERE source_schema = $1 AND source_table = $2",
            self.qualified
        );
        client
            .execute(&statement, &[&schema, &table])
            .await
            .map_err(classify)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(id: &str, vector: Option<f32>, payload: &str) -> Point {
        Point {
            key: PointKey {
                schema: "public".into(),
                table: "docs".into(),
                key: vec![id.into()],
            },
            vector: vector.map(|v| vec![v; 3]),
            payload: payload.into(),
        }
    }

    #[test]
    fn folding_keeps_the_last_write_and_an_earlier_vector() {
        let folded = last_write_per_key(&[
            point("1", Some(1.0), "a"),
            point("2", Some(2.0), "b"),
            point("1", None, "c"),
            point("2", Some(3.0), "d"),
        ]);
        assert_eq!(
            folded,
            vec![point("1", Some(1.0), "c"), point("2", Some(3.0), "d")]
        );
    }

    #[test]
    fn keys_travel_as_json_arrays() {
        let key = PointKey {
            schema: "s".into(),
            table: "t".into(),
            key: vec!["1".into(), "a\"b".into()],
        };
        assert_eq!(key_json(&key), r#"["1","a\"b"]"#);
    }
}
