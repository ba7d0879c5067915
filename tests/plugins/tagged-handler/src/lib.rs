//! Test plugin: one point per row, keyed by the primary key, with no vector and the whole row
//! as its payload plus `"handler": "<tag>"`, where the tag is fixed when the component is built
//! (`PGSTREAM_HANDLER_TAG`, `v1` when unset). Deletes and truncates delete the points. It needs
//! no embedder, so a test can compare the sink with the table row by row, and it writes every
//! change (no collapsing per row), so a test can count them.
//!
//! `make guests` builds it twice, as `tagged-handler-v1.wasm` and `tagged-handler-v2.wasm`:
//! two versions of one handler whose output tells them apart, for the hot-reload tests.

use pgstream_guest::{ChangeEvent, Error, Handler, Operation, Point, PointKey, host};

/// This build's tag.
const TAG: &str = match option_env!("PGSTREAM_HANDLER_TAG") {
    Some(tag) => tag,
    None => "v1",
};

struct TaggedHandler;

/// `payload` (a JSON object) with the tag as its first member.
fn tagged(payload: String) -> String {
    let members = payload.trim_start().strip_prefix('{').unwrap_or("}");
    let separator = if members.trim_start().starts_with('}') { "" } else { "," };
    format!("{{\"handler\":\"{TAG}\"{separator}{members}")
}

/// Consecutive writes of one kind, sent in one call when the kind changes: every change makes
/// its own write, in stream order (no collapsing per row), so a test can count them.
#[derive(Default)]
struct Writes {
    upserts: Vec<Point>,
    deletes: Vec<PointKey>,
}

impl Writes {
    fn upsert(&mut self, point: Point) -> Result<(), Error> {
        self.send_deletes()?;
        self.upserts.push(point);
        Ok(())
    }

    fn delete(&mut self, key: PointKey) -> Result<(), Error> {
        self.send_upserts()?;
        self.deletes.push(key);
        Ok(())
    }

    fn send_upserts(&mut self) -> Result<(), Error> {
        if !self.upserts.is_empty() {
            host::upsert(&std::mem::take(&mut self.upserts))?;
        }
        Ok(())
    }

    fn send_deletes(&mut self) -> Result<(), Error> {
        if !self.deletes.is_empty() {
            host::delete(&std::mem::take(&mut self.deletes))?;
        }
        Ok(())
    }

    fn send(&mut self) -> Result<(), Error> {
        self.send_upserts()?;
        self.send_deletes()
    }
}

impl Handler for TaggedHandler {
    fn handle(events: Vec<ChangeEvent>) -> Result<(), Error> {
        let mut writes = Writes::default();
        for event in events {
            match event.operation {
                Operation::Insert | Operation::Update | Operation::Read => {
                    let key = event.point_key()?;
                    if let Some(old_key) = event.old_point_key().filter(|old| *old != key) {
                        writes.delete(old_key)?;
                    }
                    let payload = tagged(event.row_json_with(&[]));
                    writes.upsert(Point {
                        key,
                        vector: None,
                        payload,
                    })?;
                }
                Operation::Delete => writes.delete(event.point_key()?)?,
                Operation::Truncate => {
                    writes.send()?;
                    host::delete_table(&event.schema, &event.table)?;
                }
            }
        }
        writes.send()
    }
}

pgstream_guest::export_handler!(TaggedHandler);
