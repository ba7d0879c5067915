//! Fuzzes the `pgoutput` decoder: arbitrary bytes must decode or return an error, never panic,
//! and whatever decodes must come back unchanged from an encode/decode round trip.
//!
//! Input layout: the first byte picks the protocol version (1 to 4, low two bits); the rest is
//! a sequence of frames, each a one-byte length and that many bytes, decoded in order by one
//! decoder so that stream blocks (and the extra xid inside them) are reachable.
#![no_main]
// The decoder's sources are compiled in directly (they depend only on `bytes`, `thiserror`
// and the `Lsn` type) so the fuzz build does not instrument wasmtime, candle and the rest of
// pgstream-host. Items and re-exports the target does not use would otherwise warn.
#![allow(dead_code, unused_imports)]

#[path = "../../host/src/lsn.rs"]
mod lsn;
#[path = "../../host/src/pgoutput/mod.rs"]
mod pgoutput;

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;

use pgoutput::{Decoder, LogicalMessage};

fuzz_target!(|data: &[u8]| {
    let Some((&config, mut rest)) = data.split_first() else {
        return;
    };
    let version = 1 + u32::from(config & 0b11);
    let mut decoder = Decoder::new(version);
    while let Some((&length, tail)) = rest.split_first() {
        let length = usize::from(length).min(tail.len());
        let (frame, tail) = tail.split_at(length);
        rest = tail;
        let in_stream_before = decoder.in_stream();
        match decoder.decode(Bytes::copy_from_slice(frame)) {
            Ok(message) => check_round_trip(version, in_stream_before, message),
            Err(_) => assert_eq!(decoder.in_stream(), in_stream_before),
        }
    }
});

fn check_round_trip(version: u32, in_stream: bool, message: LogicalMessage) {
    let mut buf = BytesMut::new();
    message
        .encode(version, &mut buf)
        .expect("a decoded message re-encodes");
    let mut replay = Decoder::new(version);
    if in_stream {
        replay
            .decode(Bytes::from_static(b"S\x00\x00\x00\x01\x01"))
            .expect("stream start");
    }
    assert_eq!(replay.decode(buf.freeze()), Ok(message));
}
