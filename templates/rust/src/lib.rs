//! {{name}}: keeps a vector store in sync with a table that has a `content` text column.
//!
//! - insert or update: embeds `content` and upserts the point, keyed by the row's primary key,
//!   with the rest of the row as the JSON payload;
//! - an update that did not touch a large (TOASTed) `content`: Postgres does not resend it, so
//!   the point is upserted without a vector and the store keeps the one it has;
//! - an update that changed the primary key: the point of the old key is deleted;
//! - `content` NULL or blank (empty or only ASCII whitespace), or a delete: the point is
//!   deleted; truncate: every point of the table.
//!
//! The host calls `handle` with a batch of changes in commit order and retries the whole batch
//! if this returns an error or traps, so everything here must be safe to run twice (upserts
//! and deletes by key are). `WritePlan` turns a batch into one `embed` and one `upsert` call.

use pgstream_guest::{ChangeEvent, Error, Field, Handler, Operation, WritePlan};

/// The column whose text is embedded. Change it to match your table.
const CONTENT: &str = "content";

struct Embedder;

impl Handler for Embedder {
    fn handle(events: Vec<ChangeEvent>) -> Result<(), Error> {
        let mut plan = WritePlan::new();
        for event in events {
            match event.operation {
                Operation::Insert | Operation::Update => {
                    let key = event.point_key()?;
                    if let Some(old_key) = event.old_point_key().filter(|old| *old != key) {
                        plan.delete(old_key);
                    }
                    let payload = event.row_json_with(&[CONTENT]);
                    match event.row().text(CONTENT)? {
                        // Blank text has no meaning to embed, and OpenAI-compatible servers
                        // refuse empty input: such a row gets no point.
                        Field::Value(text) if text.trim_ascii().is_empty() => plan.delete(key),
                        Field::Value(text) => plan.upsert(key, Some(text.to_owned()), payload),
                        Field::Unchanged => plan.upsert(key, None, payload),
                        Field::Null => plan.delete(key),
                    }
                }
                Operation::Delete => plan.delete(event.point_key()?),
                Operation::Truncate => plan.truncate(event.schema, event.table),
            }
        }
        plan.execute()
    }
}

pgstream_guest::export_handler!(Embedder);
