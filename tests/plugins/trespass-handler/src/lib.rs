//! Test plugin: tries to write outside its pipeline's own tables, so tests can check the host
//! refuses it. A row whose `content` is `other-table` is upserted under the key of a table the
//! pipeline does not watch (`other.documents`); `delete-other` deletes such a point;
//! `truncate-other` asks to delete every point of that table. Any other row is upserted
//! under its own key, like the trap handler does.

use pgstream_guest::{ChangeEvent, Error, Field, Handler, Point, PointKey, host};

struct TrespassHandler;

fn other_table_key(id: &str) -> PointKey {
    PointKey {
        schema: "other".to_owned(),
        table: "documents".to_owned(),
        key: vec![id.to_owned()],
    }
}

impl Handler for TrespassHandler {
    fn handle(events: Vec<ChangeEvent>) -> Result<(), Error> {
        let mut points = Vec::with_capacity(events.len());
        for event in &events {
            let key = event.point_key()?;
            match event.row().text("content") {
                Ok(Field::Value("other-table")) => points.push(Point {
                    key: other_table_key(&key.key[0]),
                    vector: None,
                    payload: event.row_json(),
                }),
                Ok(Field::Value("delete-other")) => host::delete(&[other_table_key(&key.key[0])])?,
                Ok(Field::Value("truncate-other")) => host::delete_table("other", "documents")?,
                _ => points.push(Point {
                    key,
                    vector: None,
                    payload: event.row_json(),
                }),
            }
        }
        if points.is_empty() {
            return Ok(());
        }
        host::upsert(&points)
    }
}

pgstream_guest::export_handler!(TrespassHandler);
