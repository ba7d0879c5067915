//! The host side of the WIT contract in `wit/`, generated once for every published version.
//!
//! This is the only `bindgen!` call in the crate. It reads the current package
//! (`wit/handler.wit`, `pgstream:handler@0.2.0`) and the frozen earlier ones (`wit/v0.1.0/`),
//! and generates the `host` interface of each from a host-only world that imports them all, so
//! one linker serves a component built against any of them. The generated `Host` traits are
//! implemented in `host_imports.rs`; the export `handle` is called through the borrowed records
//! of `event_records.rs` instead of generated owned types, so lowering a batch copies column
//! text straight from the replication frames.
//!
//! Imports are `async` because `embed`, `upsert` and `delete` await the embedder and the sink;
//! the guest sees them as ordinary blocking calls while its fiber is suspended.

wasmtime::component::bindgen!({
    path: ["../wit", "../wit/v0.1.0"],
    inline: "
        package pgstream:host-side;

        world every-version {
            import pgstream:handler/host@0.1.0;
            import pgstream:handler/host@0.2.0;
        }
    ",
    world: "pgstream:host-side/every-version",
    imports: { default: async },
});
