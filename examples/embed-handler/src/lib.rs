//! Keeps a vector store in sync with a table that has a `content` text column.
//!
//! - insert / update: embeds `content` and upserts the point (keyed by the row's key columns)
//!   with the row as a JSON payload;
//! - update that did not touch a TOASTed `content` (Postgres sends it as *unchanged*): upserts
//!   without a vector, so the store keeps the embedding and replaces only the payload;
//! - update that changed the key: deletes the point of the old key;
//! - `content` NULL or blank (empty or only ASCII whitespace): deletes the point (there is
//!   nothing to embed);
//! - delete: deletes the point; truncate: deletes every point of the table.
//!
//! The payload is the row *without* `content`. The vector stands for the content, and leaving
//! it out of the payload is what makes the unchanged case exact: a payload-only update then
//! replaces the payload with one that lacks nothing, instead of one that silently dropped the
//! text. Other unchanged (TOASTed) columns are filled from the old row when the table has
//! REPLICA IDENTITY FULL, and left out otherwise.
//!
//! A batch costs one `embed` call and one `upsert` call (plus one `delete` if anything was
//! deleted), whatever its size: `WritePlan` collapses it to the last action per row.
//!
//! The host calls `handle` with a batch of changes in commit order and retries the whole batch
//! if it returns an error or traps, so everything here must be safe to run twice (upserts and
//! deletes by key are). This file is also the starting point `pgstream-host new --lang rust`
//! writes.

use pgstream_guest::{ChangeEvent, Error, Field, Handler, Operation, WritePlan};

/// The column whose text is embedded. Change it to match your table.
const CONTENT: &str = "content";

struct EmbedHandler;

impl Handler for EmbedHandler {
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

pgstream_guest::export_handler!(EmbedHandler);
