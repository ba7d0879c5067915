//! Test plugin: panics when a row's `content` is `boom`, so tests can check that the guest's
//! panic text reaches the operator and that the instance is replaced. Any other batch is
//! handled by upserting each row's JSON (keyed by its key columns) without a vector.

use pgstream_guest::{ChangeEvent, Error, Field, Handler, Point};

/// The text of the panic; tests look for it in the trap report.
const PANIC_TEXT: &str = "trap-handler refuses content 'boom'";

struct TrapHandler;

impl Handler for TrapHandler {
    fn handle(events: Vec<ChangeEvent>) -> Result<(), Error> {
        let mut points = Vec::with_capacity(events.len());
        for event in &events {
            if event.row().text("content") == Ok(Field::Value("boom")) {
                panic!("{PANIC_TEXT} (table {}.{})", event.schema, event.table);
            }
            points.push(Point {
                key: event.point_key()?,
                vector: None,
                payload: event.row_json(),
            });
        }
        if points.is_empty() {
            return Ok(());
        }
        pgstream_guest::host::upsert(&points)
    }
}

pgstream_guest::export_handler!(TrapHandler);
