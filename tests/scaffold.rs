//! `pgstream-host new` as a new user meets it: an empty folder, one command, the project's own
//! build script, and events arriving. For every language the generated project must build on
//! the first try with the toolchains `make setup` installed, load in the host, and embed and
//! upsert the rows written to a real Postgres.

use std::path::{Path, PathBuf};
use std::process::Command;

use pgstream_e2e::{PgServer, PgVersion, TestPipeline, plugin_dir, setting};
use serde_json::Value as Json;
use tempfile::TempDir;

/// Generates one test per language `new` supports.
macro_rules! for_every_language {
    ($($language:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $language() {
            super::new_project_builds_and_handles_events(stringify!($language)).await;
        }
    )*};
}

mod new_project_builds_and_handles_events {
    for_every_language!(rust, python, js, c);
}

/// The environment a project's build script gets: the toolchains `make setup` installed,
/// named by the variables each template's README documents.
fn build_environment(language: &str) -> Vec<(String, String)> {
    let mut environment = Vec::new();
    if language == "rust" {
        // Shares compiled dependencies (wit-bindgen) with `make guests`.
        let target = plugin_dir()
            .parent()
            .map(|target| target.join("guests"))
            .expect("the plugin folder lives in the target folder");
        environment.push(("CARGO_TARGET_DIR".into(), target.display().to_string()));
    }
    for (variable, setting_name) in tool_settings(language) {
        let value = setting(setting_name)
            .unwrap_or_else(|| panic!("{setting_name} is not set: run `make setup`"));
        environment.push(((*variable).to_owned(), value));
    }
    environment
}

/// (variable the build script reads, test setting that names the installed tool).
fn tool_settings(language: &str) -> &'static [(&'static str, &'static str)] {
    match language {
        "rust" => &[],
        "python" => &[("COMPONENTIZE_PY", "PGSTREAM_COMPONENTIZE_PY")],
        "js" => &[
            ("PGSTREAM_TSC", "PGSTREAM_TSC"),
            ("PGSTREAM_ROLLDOWN", "PGSTREAM_ROLLDOWN"),
            ("PGSTREAM_COMPONENTIZE_QJS", "PGSTREAM_COMPONENTIZE_QJS"),
        ],
        "c" => &[
            ("ZIG", "PGSTREAM_ZIG"),
            ("WIT_BINDGEN", "PGSTREAM_WIT_BINDGEN"),
            ("JCO", "PGSTREAM_JCO"),
            ("WASI_REACTOR_ADAPTER", "PGSTREAM_WASI_REACTOR_ADAPTER"),
        ],
        other => panic!("no toolchain known for {other}"),
    }
}

/// Runs the project's build script (`build.sh`, or `make` where the project has a Makefile).
fn build(project: &Path, language: &str) -> PathBuf {
    let mut command = if project.join("build.sh").is_file() {
        Command::new(project.join("build.sh"))
    } else {
        let mut make = Command::new("make");
        make.arg("-C").arg(project);
        make
    };
    command
        .current_dir(project)
        .envs(build_environment(language));
    let output = command.output().expect("run the build script");
    assert!(
        output.status.success(),
        "the {language} project does not build:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let name = project.file_name().unwrap().to_string_lossy();
    let component = project.join(format!("{name}.wasm"));
    assert!(
        component.is_file(),
        "the build script did not write {}",
        component.display()
    );
    component
}

async fn new_project_builds_and_handles_events(language: &str) {
    let workspace = TempDir::new().unwrap();
    let name = format!("{language}-starter");
    // `new` writes into the current folder: run it from the empty one.
    let output = Command::new(pgstream_e2e::host_binary())
        .args(["new", "--lang", language, &name])
        .current_dir(workspace.path())
        .output()
        .expect("run pgstream-host new");
    assert!(
        output.status.success(),
        "new failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let project = workspace.path().join(&name);
    let component = build(&project, language);

    let db = PgServer::shared(PgVersion::Pg15).create_database().await;
    db.exec("CREATE TABLE docs (id int PRIMARY KEY, title text, content text);")
        .await;
    let sink = workspace.path().join("points.jsonl");
    let pipeline = TestPipeline::new(&db, "docs", "embed-handler")
        .with_plugin_file(&component)
        .with_args(&["--sink", "jsonl", "--collection"])
        .with_args(&[sink.display().to_string()]);
    pipeline.setup().await;
    db.exec(
        "INSERT INTO docs VALUES (1, 'tea', 'Steep green tea for two minutes.'),
                                 (2, 'bread', 'Bake sourdough bread.'),
                                 (3, 'gone', 'Deleted right away.');
         DELETE FROM docs WHERE id = 3;",
    )
    .await;
    pipeline.catch_up().await;

    let lines: Vec<Json> = std::fs::read_to_string(&sink)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect();
    // Replay the writes in order: what would a store hold now?
    let mut stored = std::collections::BTreeMap::new();
    for line in &lines {
        let key = line["key"].clone();
        match line["op"].as_str() {
            Some("upsert") => {
                let vector = line["vector"].as_array().expect("a vector");
                assert_eq!(vector.len(), 384, "MiniLM vectors: {line}");
                assert!(
                    line["payload"]["content"].is_string(),
                    "the text is kept: {line}"
                );
                stored.insert(key.to_string(), line["payload"].clone());
            }
            Some("delete") => {
                stored.remove(&key.to_string());
            }
            _ => panic!("unexpected write {line}"),
        }
    }
    let keys: Vec<&String> = stored.keys().collect();
    assert_eq!(keys, [r#"["1"]"#, r#"["2"]"#], "{lines:#?}");
    assert_eq!(stored[r#"["1"]"#]["title"], "tea");
    assert_eq!(
        stored[r#"["1"]"#]["content"],
        "Steep green tea for two minutes."
    );
}
