//! Finding the guest components `make guests` builds, for the host's integration tests.

use std::path::PathBuf;

/// The component `<name>.wasm` where `make guests` puts it (`PGSTREAM_WASM_DIR` overrides the
/// folder); panics saying how to build it when it is missing.
pub fn wasm(name: &str) -> PathBuf {
    let dir = std::env::var_os("PGSTREAM_WASM_DIR").map_or_else(
        || PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/wasm")),
        PathBuf::from,
    );
    let path = dir.join(format!("{name}.wasm"));
    assert!(
        path.is_file(),
        "{} is missing: run `make guests` first",
        path.display()
    );
    path
}
