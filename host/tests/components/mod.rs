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

/// A component kept in `tests/fixtures/` as it was built against an earlier WIT version
/// (`handler-0.1.0/<name>.wasm`): the proof that old components keep working unmodified.
#[allow(
    dead_code,
    reason = "not every test crate that includes this module loads a fixture"
)]
pub fn fixture(path: &str) -> PathBuf {
    let path = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures")).join(path);
    assert!(path.is_file(), "{} is missing", path.display());
    path
}
