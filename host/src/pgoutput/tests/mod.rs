//! Tests of the decoder and encoder: round trips of every message in every protocol version,
//! frames checked byte for byte against the documented layout, a catalogue of malformed
//! inputs, and a deterministic mutation run that must never panic.

mod malformed;
mod mutation;
mod round_trip;
mod samples;
