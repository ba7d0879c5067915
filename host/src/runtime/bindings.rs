//! The host side of the WIT contract in `wit/handler.wit`, generated once.
//!
//! This is the only `bindgen!` call in the crate. The generated `Host` trait for the
//! `pgstream:handler/host` interface is implemented in `host_imports.rs`; the export `handle` is
//! called through the borrowed records of `event_records.rs` instead of the generated owned
//! `ChangeEvent`, so lowering a batch copies column text straight from the replication frames.
//!
//! Imports are `async` because `embed`, `upsert` and `delete` await the embedder and the sink;
//! the guest sees them as ordinary blocking calls while its fiber is suspended.

wasmtime::component::bindgen!({
    world: "handler",
    path: "../wit",
    imports: { default: async },
});
