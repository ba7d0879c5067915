//! Where the things the tests run live: Postgres installations, the embedding model, the host
//! binary and the guest components.
//!
//! `make setup` installs Postgres and the model into `.cache/` and writes their paths to
//! `.cache/test.env`; `make test` exports them. So that a plain `cargo test -p pgstream-e2e` also
//! works after `make setup`, a variable missing from the environment is looked up in that file.
//! Cargo artifacts are found next to the running test binary, which lives in
//! `<target>/<profile>/deps/`, so the lookup follows `CARGO_TARGET_DIR` and the profile.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::SystemTime;

/// Names the environment variable holding the PostgreSQL 18 (with pgvector) bin directory.
pub const PG18_BIN_VAR: &str = "PGSTREAM_PG18_BIN";
/// Names the environment variable holding the PostgreSQL 15 (no pgvector) bin directory.
pub const PG15_BIN_VAR: &str = "PGSTREAM_PG15_BIN";
/// Names the environment variable holding the all-MiniLM-L6-v2 model folder.
pub const MODEL_DIR_VAR: &str = "PGSTREAM_MODEL_DIR";
/// Names the environment variable that, when set, overrides where guest components are found.
pub const PLUGIN_DIR_VAR: &str = "PGSTREAM_PLUGIN_DIR";
/// Names the environment variable that, when set, names the host binary to test instead of the
/// one next to the test binary (used when several checkouts share one target directory).
pub const HOST_BIN_VAR: &str = "PGSTREAM_HOST_BIN";

/// The workspace root (the parent of this crate's folder).
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .expect("the e2e crate lives one level below the workspace root")
        .to_path_buf()
}

/// Reads a setting from the environment, falling back to `.cache/test.env`.
///
/// Returns `None` when neither has it.
pub fn setting(name: &str) -> Option<String> {
    if let Some(value) = std::env::var_os(name) {
        return Some(value.to_string_lossy().into_owned());
    }
    test_env_file()
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.clone())
}

/// Like [`setting`] but panics with the fix when the setting is missing.
pub fn required_setting(name: &str) -> String {
    setting(name).unwrap_or_else(|| {
        panic!(
            "{name} is not set and .cache/test.env does not name it: run `make setup` \
             (or `make test`, which runs it)"
        )
    })
}

/// The folder of the all-MiniLM-L6-v2 model (`model.safetensors`, `tokenizer.json`,
/// `config.json`, ...), as installed by `make setup`.
pub fn model_dir() -> PathBuf {
    let dir = PathBuf::from(required_setting(MODEL_DIR_VAR));
    assert!(
        dir.join("model.safetensors").is_file(),
        "{} has no model.safetensors: run `make setup`",
        dir.display()
    );
    dir
}

/// Parses `.cache/test.env` once: `export NAME=VALUE` lines, as written by the Makefile.
fn test_env_file() -> &'static [(String, String)] {
    static ENTRIES: OnceLock<Vec<(String, String)>> = OnceLock::new();
    ENTRIES.get_or_init(|| {
        let path = workspace_root().join(".cache").join("test.env");
        let Ok(text) = std::fs::read_to_string(path) else {
            return Vec::new();
        };
        text.lines()
            .filter_map(|line| {
                let line = line.trim();
                let line = line.strip_prefix("export ").unwrap_or(line);
                let (key, value) = line.split_once('=')?;
                Some((key.trim().to_string(), value.trim().to_string()))
            })
            .collect()
    })
}

/// The cargo target directory and profile directory the running test binary was built into.
///
/// Test binaries live in `<target>/<profile>/deps/<name>-<hash>`.
fn target_dirs() -> (PathBuf, PathBuf) {
    let exe = std::env::current_exe().expect("the path of the running test binary");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binaries live in <target>/<profile>/deps/")
        .to_path_buf();
    let target_dir = profile_dir
        .parent()
        .expect("a profile directory has a parent")
        .to_path_buf();
    (target_dir, profile_dir)
}

/// The `pgstream-host` binary built for the same profile as the running tests.
///
/// Panics when it is missing or older than the host sources: cargo does not build another
/// package's binaries for these tests, and silently testing a stale binary would mislead.
/// `make test` builds it first; by hand: `cargo build -p pgstream-host`. `PGSTREAM_HOST_BIN`
/// names another binary, checked the same way.
pub fn host_binary() -> PathBuf {
    let binary = match std::env::var_os(HOST_BIN_VAR) {
        Some(path) => PathBuf::from(path),
        None => target_dirs().1.join("pgstream-host"),
    };
    let built = std::fs::metadata(&binary)
        .and_then(|meta| meta.modified())
        .unwrap_or_else(|_| {
            panic!(
                "{} does not exist: run `cargo build -p pgstream-host` (make test does)",
                binary.display()
            )
        });
    // The binary embeds the WIT contract, the project templates and the guest SDK sources
    // (for `new`) as well as the host sources.
    for sources in ["host", "wit", "templates", "guest-sdk/src"] {
        let dir = workspace_root().join(sources);
        if let Some(newest) = newest_modification(&dir) {
            assert!(
                newest <= built,
                "{} is older than the sources in {}: run `cargo build -p pgstream-host`",
                binary.display(),
                dir.display()
            );
        }
    }
    binary
}

/// The newest modification time of any file under `dir` (recursively), if it can be read.
fn newest_modification(dir: &Path) -> Option<SystemTime> {
    let mut newest = None;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            if meta.is_dir() {
                pending.push(entry.path());
            } else if let Ok(modified) = meta.modified() {
                newest = newest.max(Some(modified));
            }
        }
    }
    newest
}

/// The folder guest components are built into: `<target>/wasm/`, or `PGSTREAM_PLUGIN_DIR`.
pub fn plugin_dir() -> PathBuf {
    match setting(PLUGIN_DIR_VAR) {
        Some(dir) => PathBuf::from(dir),
        None => target_dirs().0.join("wasm"),
    }
}

/// A component kept in `tests/fixtures/` as it was built against an earlier WIT version, e.g.
/// `handler-0.1.0/echo-handler.wasm` (see the README there).
pub fn fixture_path(relative: &str) -> PathBuf {
    let path = workspace_root().join("tests/fixtures").join(relative);
    assert!(path.is_file(), "fixture {} is missing", path.display());
    path
}

/// The compiled guest component `<name>.wasm`; panics telling to run `make guests` when it is
/// missing.
pub fn plugin_path(name: &str) -> PathBuf {
    let path = plugin_dir().join(format!("{name}.wasm"));
    assert!(
        path.is_file(),
        "guest component {} is missing: run `make guests`",
        path.display()
    );
    path
}
