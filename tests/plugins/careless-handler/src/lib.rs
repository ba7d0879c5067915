//! Test plugin: a handler with a common mistake. It embeds each row's `content` and upserts
//! the points like the example handler, but when `embed` or `upsert` fails it logs a warning
//! and returns `ok`, as a `try`/`except` around the write would. The host must not confirm
//! such a batch: the write it asked for did not happen.

use pgstream_guest::{ChangeEvent, Error, Handler, LogLevel, Point, host};

struct CarelessHandler;

impl Handler for CarelessHandler {
    fn handle(events: Vec<ChangeEvent>) -> Result<(), Error> {
        let mut keys = Vec::new();
        let mut texts = Vec::new();
        for event in &events {
            if let Some(text) = event.row().text("content")?.value() {
                keys.push(event.point_key()?);
                texts.push(text.to_owned());
            }
        }
        if texts.is_empty() {
            return Ok(());
        }
        let written = host::embed(&texts).and_then(|vectors| {
            let points: Vec<Point> = keys
                .into_iter()
                .zip(vectors)
                .map(|(key, vector)| Point {
                    key,
                    vector: Some(vector),
                    payload: "{}".to_owned(),
                })
                .collect();
            host::upsert(&points)
        });
        if let Err(error) = written {
            host::log(
                LogLevel::Warn,
                &format!("careless-handler ignores a failed write: {error}"),
            );
        }
        Ok(())
    }
}

pgstream_guest::export_handler!(CarelessHandler);
