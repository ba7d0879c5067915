//! `serve`, `validate` and `status` with a config file of several pipelines: tenants see and
//! write only their own tables and files, a failing tenant is restarted while its neighbour
//! keeps flowing, every config problem is listed at once, and a standby host takes a pipeline
//! over when the active one is killed, with nothing lost.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pgstream_e2e::{
    HOST_RUN_TIMEOUT, HostProcess, PgServer, PgVersion, TestDb, plugin_path, wait_until,
    workspace_root,
};
use serde_json::Value as Json;
use tempfile::TempDir;

/// The JSON lines a sink file holds; a last line without its newline is still being written.
fn jsonl(path: &Path) -> Vec<Json> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_inclusive('\n')
        .filter_map(|line| line.strip_suffix('\n'))
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect()
}

/// The ids upserted into a jsonl sink, and the tables they came from.
fn upserted(path: &Path) -> (BTreeSet<i64>, BTreeSet<String>) {
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

/// One `[[pipeline]]` on `table`, writing the jsonl file `sink`, with test-friendly waits.
fn pipeline_block(name: &str, table: &str, plugin: &str, sink: &Path, extra: &str) -> String {
    format!(
        "[[pipeline]]
name = \"{name}\"
source = \"db\"
tables = [\"{table}\"]
plugin = \"{}\"
embedder = \"none\"
sink = \"file\"
collection = \"{}\"
batch_wait_ms = 20
progress_secs = 1
retry_backoff_ms = 50
{extra}
",
        plugin_path(plugin).display(),
        sink.display()
    )
}

/// A config file for `db` with the given pipeline blocks.
fn write_config(folder: &Path, pipelines: &[String]) -> PathBuf {
    let text = format!(
        "[settings]
plugin_cache_dir = \"{}\"

[sources.db]
dsn = \"${{TEST_SOURCE_DSN}}\"

[embedders.none]
kind = \"none\"
dimensions = 4

[sinks.file]
kind = \"jsonl\"

{}",
        workspace_root().join("target/plugin-cache").display(),
        pipelines.join("\n")
    );
    let path = folder.join("pgstream.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn host(command: &str, config: &Path, db: &TestDb) -> HostProcess {
    let mut host = HostProcess::command();
    host.args([command, "--config"])
        .arg(config)
        .env("TEST_SOURCE_DSN", db.dsn());
    HostProcess::spawn(host).expect("start the host")
}

async fn run_to_exit(command: &str, config: &Path, db: &TestDb) -> (bool, String) {
    let mut process = host(command, config, db);
    let status = process
        .wait_timeout(HOST_RUN_TIMEOUT)
        .await
        .expect("the host exits");
    (status.success(), process.log())
}

async fn insert(db: &TestDb, table: &str, ids: std::ops::RangeInclusive<i64>) {
    db.exec(&format!(
        "INSERT INTO {table} SELECT g, 'row ' || g FROM generate_series({}, {}) g",
        ids.start(),
        ids.end()
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_lists_every_problem_and_passes_a_good_file() {
    let db = PgServer::shared(PgVersion::Pg15).create_database().await;
    let folder = TempDir::new().unwrap();
    let a = folder.path().join("a.jsonl");
    let good = write_config(
        folder.path(),
        &[
            pipeline_block("tenant_a", "a_docs", "trap-handler", &a, ""),
            pipeline_block(
                "tenant_b",
                "b_docs",
                "trap-handler",
                &folder.path().join("b.jsonl"),
                "",
            ),
        ],
    );
    let (ok, log) = run_to_exit("validate", &good, &db).await;
    assert!(ok, "{log}");
    assert!(log.contains("ok, 2 pipelines: tenant_a, tenant_b"), "{log}");

    let bad = write_config(
        folder.path(),
        &[
            pipeline_block("tenant_a", "a_docs", "trap-handler", &a, "batch_size = 0"),
            // Same file as tenant_a, a slot name Postgres refuses.
            pipeline_block("Tenant-B", "b_docs", "trap-handler", &a, ""),
        ],
    );
    let (ok, log) = run_to_exit("validate", &bad, &db).await;
    assert!(!ok, "{log}");
    for needle in [
        "pipeline tenant_a: batch_size: must be at least 1",
        "pipeline Tenant-B: name: invalid replication slot name \"Tenant-B\"",
        "both write jsonl",
    ] {
        assert!(log.contains(needle), "{needle:?} missing from:\n{log}");
    }

    let typo = std::fs::read_to_string(&good)
        .unwrap()
        .replace("batch_wait_ms", "batch_wiat_ms");
    std::fs::write(&good, typo).unwrap();
    let (ok, log) = run_to_exit("validate", &good, &db).await;
    assert!(!ok && log.contains("batch_wiat_ms"), "{log}");
    assert!(log.contains("pgstream.toml:"), "the line is named:\n{log}");
    assert!(!log.contains(db.dsn()), "the DSN is never printed:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_are_isolated_and_a_failing_one_does_not_stop_its_neighbour() {
    let db = PgServer::shared(PgVersion::Pg15).create_database().await;
    db.exec(
        "CREATE TABLE a_docs (id int PRIMARY KEY, content text);
         CREATE TABLE b_docs (id int PRIMARY KEY, content text);",
    )
    .await;
    let folder = TempDir::new().unwrap();
    let (a, b) = (folder.path().join("a.jsonl"), folder.path().join("b.jsonl"));
    let config = write_config(
        folder.path(),
        &[
            pipeline_block("tenant_a", "a_docs", "trap-handler", &a, ""),
            pipeline_block("tenant_b", "b_docs", "trap-handler", &b, "max_attempts = 1"),
        ],
    );
    let mut serve = host("serve", &config, &db);
    wait_until(HOST_RUN_TIMEOUT, || async {
        serve.log().matches(" streaming ").count() >= 2
    })
    .await
    .unwrap_or_else(|error| panic!("both pipelines stream: {error}\n{}", serve.log()));

    insert(&db, "a_docs", 1..=20).await;
    insert(&db, "b_docs", 1..=20).await;
    wait_until(Duration::from_secs(60), || async {
        upserted(&a).0.len() == 20 && upserted(&b).0.len() == 20
    })
    .await
    .unwrap_or_else(|error| panic!("both tenants flow: {error}\n{}", serve.log()));

    // Tenant b's handler traps on this row, on every try: b fails and is restarted, a goes on.
    db.exec("INSERT INTO b_docs VALUES (21, 'boom')").await;
    wait_until(Duration::from_secs(60), || async {
        serve
            .log()
            .contains("pipeline failed; restarting it after a wait")
    })
    .await
    .unwrap_or_else(|error| panic!("tenant b fails: {error}\n{}", serve.log()));
    insert(&db, "a_docs", 21..=200).await;
    wait_until(Duration::from_secs(60), || async {
        upserted(&a).0.len() == 200
    })
    .await
    .unwrap_or_else(|error| panic!("tenant a keeps flowing: {error}\n{}", serve.log()));

    let (a_ids, a_tables) = upserted(&a);
    let (b_ids, b_tables) = upserted(&b);
    assert_eq!(a_ids, (1..=200).collect());
    assert_eq!(a_tables, BTreeSet::from(["a_docs".to_owned()]));
    assert_eq!(
        b_ids,
        (1..=20).collect(),
        "nothing of b's poison batch was written"
    );
    assert_eq!(b_tables, BTreeSet::from(["b_docs".to_owned()]));

    // `status` from another process: a streams, b is being restarted, with its reason.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let lines = loop {
        let (ok, log) = run_to_exit("status", &config, &db).await;
        let line = |name: &str| {
            log.lines()
                .find(|line| line.starts_with(name))
                .unwrap_or_default()
                .to_owned()
        };
        if ok
            && line("tenant_a").contains("streaming")
            && line("tenant_b").contains("boom")
            && !line("tenant_b").contains("streaming ")
        {
            break log;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "status shows both:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(!lines.contains(db.dsn()), "{lines}");

    let status = serve.terminate(HOST_RUN_TIMEOUT).await.unwrap();
    assert!(status.success(), "serve stops cleanly:\n{}", serve.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_when_the_active_host_is_killed_and_nothing_is_lost() {
    let db = PgServer::shared(PgVersion::Pg18).create_database().await;
    db.exec("CREATE TABLE docs (id int PRIMARY KEY, content text);")
        .await;
    let folder = TempDir::new().unwrap();
    let sink = folder.path().join("docs.jsonl");
    let config = write_config(
        folder.path(),
        &[pipeline_block("docs", "docs", "trap-handler", &sink, "")],
    );
    let mut first = host("serve", &config, &db);
    first
        .wait_for_log("streaming", HOST_RUN_TIMEOUT)
        .await
        .unwrap_or_else(|error| panic!("{error}\n{}", first.log()));
    let mut second = host("serve", &config, &db);
    second
        .wait_for_log("standing by", HOST_RUN_TIMEOUT)
        .await
        .unwrap_or_else(|error| panic!("{error}\n{}", second.log()));

    insert(&db, "docs", 1..=500).await;
    wait_until(Duration::from_secs(60), || async {
        !upserted(&sink).0.is_empty()
    })
    .await
    .unwrap();
    first.kill().await.unwrap();
    let killed_at = std::time::Instant::now();
    insert(&db, "docs", 501..=1000).await;
    second
        .wait_for_log("took the pipeline's lease", Duration::from_secs(30))
        .await
        .unwrap_or_else(|error| panic!("the standby takes over: {error}\n{}", second.log()));
    wait_until(Duration::from_secs(60), || async {
        upserted(&sink).0.len() == 1000
    })
    .await
    .unwrap_or_else(|error| {
        panic!(
            "everything arrives: {error} ({} ids)\n{}",
            upserted(&sink).0.len(),
            second.log()
        )
    });
    println!(
        "takeover: new WAL written {:?} after the kill",
        killed_at.elapsed()
    );
    assert_eq!(upserted(&sink).0, (1..=1000).collect());
    let status = second.terminate(HOST_RUN_TIMEOUT).await.unwrap();
    assert!(status.success(), "{}", second.log());
}
