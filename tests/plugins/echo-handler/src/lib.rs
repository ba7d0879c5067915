//! Test plugin: reports every event it received back to the host, so a test can check that
//! names, OIDs, NULL / unchanged / text values and metadata arrive intact.
//!
//! For each event it upserts one point keyed `[schema, table, ["<index in batch>"]]` whose
//! payload is the event as JSON:
//! `{"operation", "schema", "table", "lsn", "commit_time", "xid", "key_columns", "row",
//! "old_row"}`, a column being `{"name", "type_oid", "value"}` with `value` one of
//! `{"null": true}`, `{"unchanged": true}`, `{"text": "..."}`. Rows with a text `content`
//! column are embedded (one `embed` call per batch) and their points carry the vector. It
//! also logs one line through the `log` import and prints one to stdout.

use pgstream_guest::{
    ChangeEvent, Column, Error, Handler, LogLevel, Operation, Point, PointKey, Value, host,
};
use serde_json::{Value as Json, json};

struct EchoHandler;

fn column_json(column: &Column) -> Json {
    let value = match &column.value {
        Value::Null => json!({ "null": true }),
        Value::Unchanged => json!({ "unchanged": true }),
        Value::Text(text) => json!({ "text": text }),
    };
    json!({ "name": column.name, "type_oid": column.type_oid, "value": value })
}

fn event_json(event: &ChangeEvent) -> Json {
    let operation = match event.operation {
        Operation::Insert => "insert",
        Operation::Update => "update",
        Operation::Delete => "delete",
        Operation::Truncate => "truncate",
        Operation::Read => "read",
    };
    json!({
        "operation": operation,
        "schema": event.schema,
        "table": event.table,
        "lsn": event.lsn,
        "commit_time": event.commit_time,
        "xid": event.xid,
        "key_columns": event.key_columns,
        "row": event.row.iter().map(column_json).collect::<Vec<_>>(),
        "old_row": event.old_row.as_ref().map(|row| row.iter().map(column_json).collect::<Vec<_>>()),
    })
}

impl Handler for EchoHandler {
    fn handle(events: Vec<ChangeEvent>) -> Result<(), Error> {
        host::log(
            LogLevel::Info,
            &format!("echo-handler got {} events", events.len()),
        );
        println!("echo-handler stdout: {} events", events.len());

        let texts: Vec<String> = events
            .iter()
            .filter_map(|event| event.row().text("content").ok()?.value().map(str::to_owned))
            .collect();
        let mut vectors = if texts.is_empty() {
            Vec::new()
        } else {
            host::embed(&texts)?
        }
        .into_iter();

        let points: Vec<Point> = events
            .iter()
            .enumerate()
            .map(|(index, event)| {
                let has_text = event
                    .row()
                    .text("content")
                    .is_ok_and(|field| field.value().is_some());
                Point {
                    key: PointKey {
                        schema: event.schema.clone(),
                        table: event.table.clone(),
                        key: vec![index.to_string()],
                    },
                    vector: if has_text { vectors.next() } else { None },
                    payload: event_json(event).to_string(),
                }
            })
            .collect();
        host::upsert(&points)
    }
}

pgstream_guest::export_handler!(EchoHandler);
