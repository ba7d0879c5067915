//! Test plugin: rejects every batch with an error value (not a trap), so tests can check that
//! the message reaches the host and that the instance stays usable.

use pgstream_guest::{ChangeEvent, Error, Handler};

struct ErrorHandler;

impl Handler for ErrorHandler {
    fn handle(events: Vec<ChangeEvent>) -> Result<(), Error> {
        Err(Error::new(format!(
            "error-handler rejects a batch of {} events",
            events.len()
        )))
    }
}

pgstream_guest::export_handler!(ErrorHandler);
