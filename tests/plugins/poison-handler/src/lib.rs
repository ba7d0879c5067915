//! Test plugin: a handler with a bug that one kind of row trips. It writes each row as a point
//! without a vector (the row as its payload; no embedder needed), but fails the whole batch
//! when a row's `body` contains "poison", as a handler whose code cannot cope with some value
//! would. Tests use it to check the dead-letter queue: that row, and only it, ends there.

use pgstream_guest::{ChangeEvent, Error, Field, Handler, Operation, WritePlan};

struct PoisonHandler;

impl Handler for PoisonHandler {
    fn handle(events: Vec<ChangeEvent>) -> Result<(), Error> {
        let mut plan = WritePlan::new();
        for event in events {
            match event.operation {
                Operation::Insert | Operation::Update | Operation::Read => {
                    if let Field::Value(body) = event.row().text("body")?
                        && body.contains("poison")
                    {
                        return Err(Error::new(format!("cannot handle the body {body:?}")));
                    }
                    plan.upsert(event.point_key()?, None, event.row_json());
                }
                Operation::Delete => plan.delete(event.point_key()?),
                Operation::Truncate => plan.truncate(event.schema, event.table),
            }
        }
        plan.execute()
    }
}

pgstream_guest::export_handler!(PoisonHandler);
