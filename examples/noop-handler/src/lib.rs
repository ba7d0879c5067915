//! Accepts every batch without looking at it: what remains is the runtime's own cost of
//! passing events into a guest, which the host's benchmark measures.

use pgstream_guest::{ChangeEvent, Error, Handler};

struct NoopHandler;

impl Handler for NoopHandler {
    fn handle(_events: Vec<ChangeEvent>) -> Result<(), Error> {
        Ok(())
    }
}

pgstream_guest::export_handler!(NoopHandler);
