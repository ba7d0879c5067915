//! pgstream-host streams row changes out of Postgres and runs each batch of them through a
//! sandboxed WebAssembly handler that turns them into vector-store writes.
//!
//! The data flows one way:
//!
//! ```text
//! replication (CopyBoth stream of WAL frames)
//!   -> pgoutput (pure decoder, zero-copy over Bytes)
//!   -> source (a ChangeSource: changes, commits, idle positions; takes confirmations)
//!   -> pipeline (batches of ChangeEvents, ACK bookkeeping, retries)
//!   -> runtime (wasmtime component per pipeline, `handle(events)`)
//!   -> host imports: embed / upsert / delete / log
//!   -> embed::Embedder and sink::Sink
//! ```
//!
//! A WAL position is confirmed to Postgres only after the handler call that covered every event
//! of the transactions up to it returned successfully: delivery is at least once, and a crash
//! replays rather than skips.
#![warn(missing_docs)]

pub mod assembly;
mod backoff;
pub mod config;
pub mod coordination;
pub mod dead_letter;
pub mod embed;
pub mod error_chain;
pub mod event;
pub mod lsn;
pub mod metrics;
pub mod pgoutput;
pub mod pipeline;
pub mod point;
pub mod reload;
pub mod replication;
pub mod runtime;
pub mod scaffold;
pub mod sink;
pub mod source;
pub mod supervisor;
