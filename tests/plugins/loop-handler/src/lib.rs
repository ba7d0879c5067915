//! Test plugin: never returns, to check time limits. If the first row's `content` is `sleep`
//! it blocks in a WASI sleep (no wasm code runs, so only the host's watchdog can stop it);
//! otherwise it spins in wasm code (stopped by the epoch deadline).

use std::time::Duration;

use pgstream_guest::{ChangeEvent, Error, Field, Handler};

struct LoopHandler;

impl Handler for LoopHandler {
    fn handle(events: Vec<ChangeEvent>) -> Result<(), Error> {
        let sleep = events
            .first()
            .is_some_and(|event| event.row().text("content") == Ok(Field::Value("sleep")));
        if sleep {
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        let mut counter: u64 = 0;
        loop {
            counter = std::hint::black_box(counter.wrapping_add(1));
        }
    }
}

pgstream_guest::export_handler!(LoopHandler);
