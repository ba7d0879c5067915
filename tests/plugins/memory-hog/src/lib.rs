//! Test plugin: allocates (and touches) memory 1 MiB at a time until the host's memory limit
//! stops it.

use pgstream_guest::{ChangeEvent, Error, Handler};

struct MemoryHog;

impl Handler for MemoryHog {
    fn handle(_events: Vec<ChangeEvent>) -> Result<(), Error> {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            hoard.push(vec![1u8; 1024 * 1024]);
            std::hint::black_box(&hoard);
        }
    }
}

pgstream_guest::export_handler!(MemoryHog);
