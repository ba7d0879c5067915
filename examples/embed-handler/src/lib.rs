//! Keeps a vector store in sync with a table that has a `content` text column.
//!
//! - insert / update / read (a row a backfill delivers): embeds `content` and writes the point
//!   (keyed by the row's key columns) with the row, `content` included, as its JSON payload,
//!   so retrieval can read the text back from the store;
//! - update that left some TOASTed column *unchanged* (Postgres did not send it): the payload
//!   lacks that column, so it is merged into the stored payload instead of replacing it, and
//!   the stored value survives; when `content` itself is unchanged the stored vector is kept;
//! - update that changed the key: deletes the point of the old key;
//! - `content` NULL or blank (empty or only ASCII whitespace): deletes the point (there is
//!   nothing to embed);
//! - delete: deletes the point; truncate: deletes every point of the table.
//!
//! Unchanged columns are filled from the old row when the table has REPLICA IDENTITY FULL, so
//! such a table's payloads are whole and simply replace the stored ones.
//!
//! A batch costs one `embed` call and one `upsert` call (plus one `merge` and one `delete` when
//! needed), whatever its size: `WritePlan` collapses it to the last action per row.
//!
//! The host calls `handle` with a batch of changes in commit order and retries the whole batch
//! if it returns an error or traps, so everything here must be safe to run twice (writes and
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
                Operation::Insert | Operation::Update | Operation::Read => {
                    let key = event.point_key()?;
                    if let Some(old_key) = event.old_point_key().filter(|old| *old != key) {
                        plan.delete(old_key);
                    }
                    let payload = event.row_json_with(&[]);
                    let text = match event.row().text(CONTENT)? {
                        // Blank text has no meaning to embed, and OpenAI-compatible servers
                        // refuse empty input: such a row gets no point.
                        Field::Value(text) if text.trim_ascii().is_empty() => {
                            plan.delete(key);
                            continue;
                        }
                        Field::Null => {
                            plan.delete(key);
                            continue;
                        }
                        Field::Value(text) => Some(text.to_owned()),
                        Field::Unchanged => None,
                    };
                    if event.is_partial() {
                        plan.merge(key, text, payload);
                    } else {
                        plan.upsert(key, text, payload);
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
