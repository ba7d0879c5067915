//! Assembling a pipeline from its spec when the plugin file has been broken since the running
//! version was loaded: the supervisor's restart falls back on that version (from the same file
//! only), where a first start fails.

use pgstream_host::assembly::{SharedResources, assemble, assemble_with_fallback, load_plugin};
use pgstream_host::config::ConfigFile;

mod components;
use components::wasm;

/// A config of two pipelines on `folder/a.wasm` and `folder/b.wasm`, touching no server.
fn config(folder: &std::path::Path) -> ConfigFile {
    let pipeline = |name: &str| {
        format!(
            "[[pipeline]]
name = \"{name}\"
source = \"db\"
tables = [\"docs\"]
plugin = \"{name}.wasm\"
embedder = \"none\"
sink = \"file\"
collection = \"{name}.jsonl\"
"
        )
    };
    let text = format!(
        "[sources.db]
dsn = \"postgres://nobody@127.0.0.1:1/none\"

[embedders.none]
kind = \"none\"
dimensions = 4

[sinks.file]
kind = \"jsonl\"

{}
{}",
        pipeline("a"),
        pipeline("b")
    );
    ConfigFile::parse(&text, "test.toml", folder, |_| None).expect("a valid config")
}

#[tokio::test]
async fn a_restart_runs_the_last_version_that_loaded_when_the_file_is_broken() {
    let folder = tempfile::tempdir().unwrap();
    for name in ["a", "b"] {
        std::fs::copy(
            wasm("tagged-handler-v1"),
            folder.path().join(format!("{name}.wasm")),
        )
        .unwrap();
    }
    let file = config(folder.path());
    let shared = SharedResources::new(&file.settings).unwrap();
    let (a, b) = (&file.pipelines[0], &file.pipelines[1]);
    let running_a = load_plugin(&shared, &a.plugin).await.unwrap();
    let running_b = load_plugin(&shared, &b.plugin).await.unwrap();

    std::fs::write(&a.plugin, b"a broken deploy").unwrap();
    let first_start = assemble(a, &shared)
        .await
        .err()
        .expect("a first start fails");
    assert!(first_start.to_string().contains("a.wasm"), "{first_start}");
    assemble_with_fallback(a, &shared, Some(running_a))
        .await
        .expect("a restart runs the version that loaded");
    // Another file's version is never a fallback.
    assert!(
        assemble_with_fallback(a, &shared, Some(running_b))
            .await
            .is_err()
    );
    assert!(assemble(b, &shared).await.is_ok(), "b's file is intact");
}
