//! Config files of several pipelines for `serve`, `validate` and `status`, and readers of the
//! JSON-lines files their sinks write: what the multi-tenant tests and benchmarks share.
//!
//! Every config written here has the source block `db` (its DSN from `TEST_SOURCE_DSN`, so the
//! secret is interpolated, never written to the file), the embedder `none` (4 dimensions) and
//! the jsonl sink `file`; more blocks can be added for a test's own needs.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value as Json;

use crate::{HostProcess, TestDb, plugin_path, workspace_root};

/// The variable the config's source DSN is read from.
pub const SOURCE_DSN_VAR: &str = "TEST_SOURCE_DSN";

/// The JSON lines a sink file holds; a last line without its newline is still being written
/// and is left out.
pub fn jsonl(path: &Path) -> Vec<Json> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_inclusive('\n')
        .filter_map(|line| line.strip_suffix('\n'))
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect()
}

/// The `id`s of the payloads upserted into a jsonl sink, and the tables they came from.
pub fn upserted(path: &Path) -> (BTreeSet<i64>, BTreeSet<String>) {
    let mut ids = BTreeSet::new();
    let mut tables = BTreeSet::new();
    for line in jsonl(path) {
        if line["op"] == "upsert" {
            ids.insert(line["payload"]["id"].as_i64().expect("an id"));
            tables.insert(line["table"].as_str().unwrap_or_default().to_owned());
        }
    }
    (ids, tables)
}

/// The `id`s of the payloads upserted into a jsonl sink.
pub fn upserted_ids(path: &Path) -> BTreeSet<i64> {
    upserted(path).0
}

/// One `[[pipeline]]` watching `table` with the test plugin `plugin`, writing the jsonl file
/// `sink`, with test-friendly waits; `extra` is more `key = value` lines.
pub fn jsonl_pipeline(name: &str, table: &str, plugin: &str, sink: &Path, extra: &str) -> String {
    pipeline(
        name,
        table,
        plugin,
        "file",
        &sink.display().to_string(),
        extra,
    )
}

/// One `[[pipeline]]` watching `table` with the test plugin `plugin`, writing `collection` of
/// the sink block `sink`.
pub fn pipeline(
    name: &str,
    table: &str,
    plugin: &str,
    sink: &str,
    collection: &str,
    extra: &str,
) -> String {
    pipeline_on_file(name, table, &plugin_path(plugin), sink, collection, extra)
}

/// [`pipeline`] with the component at `plugin` (a file a test may replace).
pub fn pipeline_on_file(
    name: &str,
    table: &str,
    plugin: &Path,
    sink: &str,
    collection: &str,
    extra: &str,
) -> String {
    format!(
        "[[pipeline]]
name = \"{name}\"
source = \"db\"
tables = [\"{table}\"]
plugin = \"{}\"
embedder = \"none\"
sink = \"{sink}\"
collection = \"{collection}\"
batch_wait_ms = 20
progress_secs = 1
retry_backoff_ms = 50
{extra}
",
        plugin.display(),
    )
}

/// Writes `folder/pgstream.toml`: the shared blocks, `blocks` (more `[sinks.*]` and the like),
/// then `pipelines`.
pub fn write_config(folder: &Path, blocks: &str, pipelines: &[String]) -> PathBuf {
    let text = format!(
        "[settings]
plugin_cache_dir = \"{}\"

[sources.db]
dsn = \"${{{SOURCE_DSN_VAR}}}\"

[embedders.none]
kind = \"none\"
dimensions = 4

[sinks.file]
kind = \"jsonl\"

{blocks}
{}",
        workspace_root().join("target/plugin-cache").display(),
        pipelines.join("\n")
    );
    let path = folder.join("pgstream.toml");
    std::fs::write(&path, text).expect("write the config file");
    path
}

/// Starts `pgstream-host <command> --config <config>` against `db`.
pub fn start_host(command: &str, config: &Path, db: &TestDb) -> HostProcess {
    let mut host = HostProcess::command();
    host.args([command, "--config"])
        .arg(config)
        .env(SOURCE_DSN_VAR, db.dsn());
    HostProcess::spawn(host).expect("start the host")
}
