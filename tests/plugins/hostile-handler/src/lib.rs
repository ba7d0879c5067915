//! Test plugin: a hostile tenant. A batch holding a row whose `content` names a misdeed
//! commits it, on every try, so tests and benchmarks can check that the host contains it while
//! the neighbours keep flowing:
//!
//! - `loop`: spins in wasm code forever (the call timeout must stop it);
//! - `hog`: allocates and touches memory until the memory limit stops it;
//! - `trap`: panics;
//! - `embed-flood`: asks to embed 100,000 texts of 100 bytes in one call (the pipeline's embed
//!   limits must refuse it);
//! - `log-flood`: logs a million lines, then handles the batch (the log budget must hold).
//!
//! Any other batch is handled like the trap handler does: each row's JSON upserted without a
//! vector, so the hostile pipeline's own good rows still arrive.

use pgstream_guest::{ChangeEvent, Error, Field, Handler, LogLevel, Point, host};

/// Texts in the oversize `embed` call.
const FLOOD_TEXTS: usize = 100_000;

/// Lines the log flood writes.
const FLOOD_LINES: usize = 1_000_000;

struct HostileHandler;

impl Handler for HostileHandler {
    fn handle(events: Vec<ChangeEvent>) -> Result<(), Error> {
        for event in &events {
            if let Ok(Field::Value(content)) = event.row().text("content") {
                misbehave(content)?;
            }
        }
        let points: Vec<Point> = events
            .iter()
            .map(|event| {
                Ok(Point {
                    key: event.point_key()?,
                    vector: None,
                    payload: event.row_json(),
                })
            })
            .collect::<Result<_, Error>>()?;
        if points.is_empty() {
            return Ok(());
        }
        host::upsert(&points)
    }
}

/// Commits the misdeed `content` names, if it names one.
fn misbehave(content: &str) -> Result<(), Error> {
    match content {
        "loop" => {
            let mut counter: u64 = 0;
            loop {
                counter = std::hint::black_box(counter.wrapping_add(1));
            }
        }
        "hog" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 1024 * 1024]);
                std::hint::black_box(&hoard);
            }
        }
        "trap" => panic!("hostile-handler traps on purpose"),
        "embed-flood" => {
            let text = "x".repeat(100);
            let texts = vec![text; FLOOD_TEXTS];
            host::embed(&texts)?;
            Ok(())
        }
        "log-flood" => {
            for line in 0..FLOOD_LINES {
                host::log(LogLevel::Info, &format!("hostile-handler flood line {line}"));
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

pgstream_guest::export_handler!(HostileHandler);
