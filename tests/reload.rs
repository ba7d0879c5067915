//! Hot reload. Under a steady write load, SIGHUP (or `--watch` seeing the file replaced) swaps
//! a new plugin version in between two batches: every change reaches the sink exactly once
//! (nothing replayed, nothing skipped), the new version's output starts at one point of the
//! stream and the old one's never comes back, and a broken new component is rejected while the
//! running one goes on. Under `serve`, a changed config file starts new pipelines, stops removed
//! ones and restarts only the changed ones; a failed pipeline fixed by a reload becomes ready.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pgstream_e2e::metrics_endpoint::{free_port, get, sample};
use pgstream_e2e::tenants::{SOURCE_DSN_VAR, jsonl, pipeline_on_file, write_config};
use pgstream_e2e::{
    HOST_RUN_TIMEOUT, HostProcess, PgServer, PgVersion, TestDb, TestPipeline, plugin_path,
    wait_until,
};
use serde_json::Value as Json;
use tempfile::TempDir;

/// A `[[pipeline]]` block on the plugin file `plugin`, writing the jsonl file `sink`.
fn pipeline_block(name: &str, table: &str, plugin: &Path, sink: &Path, extra: &str) -> String {
    let extra = format!("batch_size = 50\n{extra}");
    pipeline_on_file(
        name,
        table,
        plugin,
        "file",
        &sink.display().to_string(),
        &extra,
    )
}

/// Replaces `target` with the file `source` the way a deploy does: a new file renamed over
/// the old one, so the host never reads half a component.
fn deploy(source: &Path, target: &Path) {
    let staged = target.with_extension("wasm.new");
    std::fs::copy(source, &staged).expect("stage the new plugin");
    std::fs::rename(&staged, target).expect("replace the plugin");
}

/// A database with `docs (id, content)`, and a folder holding the plugin file (v1 of the
/// tagged handler) and the path of the jsonl sink.
async fn docs_with_v1(version: PgVersion) -> (TestDb, TempDir, PathBuf, PathBuf) {
    let db = PgServer::shared(version).create_database().await;
    db.exec("CREATE TABLE docs (id int PRIMARY KEY, content text);")
        .await;
    let folder = TempDir::new().unwrap();
    let plugin = folder.path().join("handler.wasm");
    deploy(&plugin_path("tagged-handler-v1"), &plugin);
    let sink = folder.path().join("docs.jsonl");
    (db, folder, plugin, sink)
}

fn start_serve(config: &Path, port: u16, db: &TestDb, watch: bool) -> HostProcess {
    let mut host = HostProcess::command();
    host.args(["serve", "--config"])
        .arg(config)
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .env(SOURCE_DSN_VAR, db.dsn());
    if watch {
        host.arg("--watch");
    }
    HostProcess::spawn(host).expect("start the host")
}

/// The sink's lines of upserts, in the order written.
fn upserts(sink: &Path) -> Vec<Json> {
    jsonl(sink)
        .into_iter()
        .filter(|line| line["op"] == "upsert")
        .collect()
}

/// What the sink holds once its lines are replayed: id -> (content, handler tag).
fn replayed(sink: &Path) -> BTreeMap<i64, (String, String)> {
    let mut points = BTreeMap::new();
    for line in jsonl(sink) {
        let id = line["key"][0].as_str().and_then(|id| id.parse().ok());
        match (line["op"].as_str(), id) {
            (Some("upsert"), Some(id)) => {
                let payload = &line["payload"];
                let content = payload["content"].as_str().unwrap_or_default().to_owned();
                let tag = payload["handler"].as_str().unwrap_or_default().to_owned();
                points.insert(id, (content, tag));
            }
            (Some("delete"), Some(id)) => {
                points.remove(&id);
            }
            _ => {}
        }
    }
    points
}

async fn table_rows(db: &TestDb, table: &str) -> BTreeMap<i64, String> {
    let client = db.connect().await;
    client
        .query(&format!("SELECT id, content FROM {table}"), &[])
        .await
        .unwrap()
        .iter()
        .map(|row| (i64::from(row.get::<_, i32>(0)), row.get(1)))
        .collect()
}

/// Writes to `table` until told to stop, one small transaction every few milliseconds: an
/// insert each time, an update every third and a delete every seventh. Returns how many
/// inserts and updates (each makes one upsert) and deletes it made.
fn steady_writes(
    client: tokio_postgres::Client,
    table: &'static str,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<(u64, u64)> {
    tokio::spawn(async move {
        let (mut upserts, mut deletes) = (0u64, 0u64);
        let mut id = 0i32;
        while !*stop.borrow() {
            id += 1;
            let insert = format!("INSERT INTO {table} VALUES ({id}, 'row {id}')");
            client.batch_execute(&insert).await.unwrap();
            upserts += 1;
            if id % 3 == 0 {
                let update = format!(
                    "UPDATE {table} SET content = 'row {id} edited' WHERE id = {}",
                    id - 1
                );
                client.batch_execute(&update).await.unwrap();
                upserts += 1;
            }
            if id % 7 == 0 {
                let delete = format!("DELETE FROM {table} WHERE id = {}", id - 5);
                client.batch_execute(&delete).await.unwrap();
                deletes += 1;
            }
            tokio::select! {
                _ = stop.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(4)) => {}
            }
        }
        (upserts, deletes)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_swaps_the_plugin_between_batches_under_load_and_rejects_a_broken_one() {
    let (db, folder, plugin, sink) = docs_with_v1(PgVersion::Pg15).await;
    let config = write_config(
        folder.path(),
        "",
        &[pipeline_block("docs", "docs", &plugin, &sink, "")],
    );
    let port = free_port();
    let mut host = start_serve(&config, port, &db, false);
    host.wait_for_log(" streaming ", HOST_RUN_TIMEOUT)
        .await
        .expect("the pipeline streams");

    let (stop_writes, stopping) = tokio::sync::watch::channel(false);
    let writer = steady_writes(db.connect().await, "docs", stopping);
    wait_until(Duration::from_secs(60), || async {
        upserts(&sink).len() >= 150
    })
    .await
    .unwrap_or_else(|error| panic!("v1 writes arrive: {error}\n{}", host.log()));
    deploy(&plugin_path("tagged-handler-v2"), &plugin);
    host.hang_up().unwrap();
    host.wait_for_log(
        "first batch handled by the reloaded plugin",
        Duration::from_secs(60),
    )
    .await
    .expect("the new version handles a batch");
    let before = upserts(&sink).len();
    wait_until(Duration::from_secs(60), || async {
        upserts(&sink).len() >= before + 150
    })
    .await
    .unwrap_or_else(|error| panic!("v2 writes arrive: {error}\n{}", host.log()));
    stop_writes.send(true).unwrap();
    let (upserted, deleted) = writer.await.unwrap();

    // Everything arrives, once: as many upsert lines as inserts and updates were made, and as
    // many delete lines as deletes (the handler writes a batch's deletes after its upserts, so
    // the upserts alone being there does not mean the last delete is).
    wait_until(Duration::from_secs(60), || async {
        let lines = jsonl(&sink);
        let deletes = lines.iter().filter(|line| line["op"] == "delete").count() as u64;
        upserts(&sink).len() as u64 >= upserted && deletes >= deleted
    })
    .await
    .unwrap_or_else(|error| panic!("the sink catches up: {error}\n{}", host.log()));
    let lines = jsonl(&sink);
    let upsert_lines = upserts(&sink);
    // Exactly once, unless the replication connection itself was lost on this busy machine
    // (a walsender timeout): then the unconfirmed changes are replayed, as they must be.
    let reconnected = host.log().contains("reconnecting");
    if reconnected {
        assert!(upsert_lines.len() as u64 >= upserted, "nothing skipped");
    } else {
        assert_eq!(upsert_lines.len() as u64, upserted, "no change replayed");
    }
    let delete_lines = lines.iter().filter(|line| line["op"] == "delete").count() as u64;
    if !reconnected {
        assert_eq!(delete_lines, deleted, "every delete once");
    }
    let points = replayed(&sink);
    let rows = table_rows(&db, "docs").await;
    let contents: BTreeMap<i64, String> = points
        .iter()
        .map(|(id, (content, _))| (*id, content.clone()))
        .collect();
    assert_eq!(contents, rows, "the sink equals the table");

    // v1 up to one point of the stream, v2 from there on.
    let tags: Vec<&str> = upsert_lines
        .iter()
        .map(|line| line["payload"]["handler"].as_str().unwrap())
        .collect();
    let switch = tags.iter().position(|tag| *tag == "v2").expect("v2 wrote");
    assert!(switch >= 150, "v1 wrote the first lines");
    assert!(
        tags[..switch].iter().all(|tag| *tag == "v1")
            && tags[switch..].iter().all(|tag| *tag == "v2"),
        "one switch from v1 to v2"
    );

    let (_, metrics) = get(port, "/metrics").await.expect("metrics answer");
    let reloads = |result| {
        sample(
            &metrics,
            "pgstream_plugin_reloads_total",
            &[("pipeline", "docs"), ("result", result)],
        )
    };
    assert_eq!(reloads("applied"), Some(1.0), "{metrics}");
    assert!(
        sample(
            &metrics,
            "pgstream_plugin_reload_seconds_count",
            &[("pipeline", "docs")]
        ) == Some(1.0),
        "{metrics}"
    );

    // A broken new version (not a component at all) is rejected; v2 goes on.
    std::fs::write(folder.path().join("broken.wasm"), b"not a component").unwrap();
    deploy(&folder.path().join("broken.wasm"), &plugin);
    host.hang_up().unwrap();
    host.wait_for_log("new plugin version rejected", Duration::from_secs(60))
        .await
        .expect("the broken version is rejected");
    db.exec("INSERT INTO docs VALUES (1000000, 'after the broken deploy')")
        .await;
    wait_until(Duration::from_secs(60), || async {
        replayed(&sink)
            .get(&1_000_000)
            .is_some_and(|(_, tag)| tag == "v2")
    })
    .await
    .unwrap_or_else(|error| panic!("v2 keeps running: {error}\n{}", host.log()));
    let (_, metrics) = get(port, "/metrics").await.expect("metrics answer");
    assert_eq!(
        sample(
            &metrics,
            "pgstream_plugin_reloads_total",
            &[("pipeline", "docs"), ("result", "rejected")],
        ),
        Some(1.0),
        "{metrics}"
    );
    assert!(
        host.terminate(HOST_RUN_TIMEOUT).await.unwrap().success(),
        "{}",
        host.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_reloads_the_plugin_when_its_file_is_replaced() {
    let (db, _folder, plugin, sink) = docs_with_v1(PgVersion::Pg18).await;
    let pipeline = TestPipeline::new(&db, "docs", "tagged-handler-v1")
        .with_plugin_file(&plugin)
        .with_args(&[
            "--sink",
            "jsonl",
            "--collection",
            &sink.display().to_string(),
            "--embedder",
            "none",
            "--watch",
        ]);
    let mut host = pipeline.start_streaming().await;
    db.exec("INSERT INTO docs VALUES (1, 'before')").await;
    wait_until(Duration::from_secs(60), || async {
        replayed(&sink).contains_key(&1)
    })
    .await
    .unwrap_or_else(|error| panic!("v1 writes: {error}\n{}", host.log()));
    deploy(&plugin_path("tagged-handler-v2"), &plugin);
    host.wait_for_log("plugin reloaded", Duration::from_secs(60))
        .await
        .expect("the replaced file is reloaded without a signal");
    db.exec("INSERT INTO docs VALUES (2, 'after')").await;
    wait_until(Duration::from_secs(60), || async {
        replayed(&sink).contains_key(&2)
    })
    .await
    .unwrap_or_else(|error| panic!("v2 writes: {error}\n{}", host.log()));
    let points = replayed(&sink);
    assert_eq!(points[&1].1, "v1");
    assert_eq!(points[&2].1, "v2");
    assert!(
        host.terminate(HOST_RUN_TIMEOUT).await.unwrap().success(),
        "{}",
        host.log()
    );
}

/// How many times pipeline `name` started streaming, by the host's log.
fn streams(log: &str, name: &str) -> usize {
    log.lines()
        .filter(|line| line.contains(" streaming ") && line.contains(&format!("pipeline={name} ")))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_reload_adds_removes_and_restarts_only_changed_pipelines() {
    let db = PgServer::shared(PgVersion::Pg15).create_database().await;
    for table in ["a_docs", "b_docs", "c_docs", "d_docs"] {
        db.exec(&format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, content text);"
        ))
        .await;
    }
    let folder = TempDir::new().unwrap();
    let v1 = plugin_path("tagged-handler-v1");
    let sink = |name: &str| folder.path().join(format!("{name}.jsonl"));
    let block = |name: &str, extra: &str| {
        pipeline_block(name, &format!("{name}_docs"), &v1, &sink(name), extra)
    };
    // `d` starts broken (its plugin does not exist): failed, and the host not ready.
    let missing = folder.path().join("missing.wasm");
    let broken_d = pipeline_block("d", "d_docs", &missing, &sink("d"), "");
    let config = write_config(
        folder.path(),
        "",
        &[block("a", ""), block("b", ""), block("c", ""), broken_d],
    );
    let port = free_port();
    let mut host = start_serve(&config, port, &db, false);
    wait_until(Duration::from_secs(120), || async {
        let log = host.log();
        ["a", "b", "c"].iter().all(|name| streams(&log, name) == 1)
            && matches!(get(port, "/readyz").await, Some((503, body)) if body.contains("missing.wasm"))
    })
    .await
    .unwrap_or_else(|error| panic!("a, b, c stream and d failed: {error}\n{}", host.log()));

    // A file with a problem is rejected whole; everything keeps running.
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{good}\n[[pipeline]]\nname = 7\n")).unwrap();
    host.hang_up().unwrap();
    host.wait_for_log("config reload rejected", Duration::from_secs(30))
        .await
        .expect("the bad file is rejected");

    // a unchanged, b changed, c removed, d fixed.
    write_config(
        folder.path(),
        "",
        &[
            block("a", ""),
            block("b", "max_attempts = 4"),
            block("d", ""),
        ],
    );
    host.hang_up().unwrap();
    wait_until(Duration::from_secs(120), || async {
        matches!(get(port, "/readyz").await, Some((200, body)) if !body.contains("\"c\""))
    })
    .await
    .unwrap_or_else(|error| panic!("d recovers and the host is ready: {error}\n{}", host.log()));
    let (_, body) = get(port, "/readyz").await.unwrap();
    let ready: Json = serde_json::from_str(&body).unwrap();
    let names: Vec<&str> = ready["pipelines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|pipeline| pipeline["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "b", "d"], "{body}");
    let log = host.log();
    assert_eq!(streams(&log, "a"), 1, "a was not restarted\n{log}");
    assert_eq!(streams(&log, "b"), 2, "b was restarted once\n{log}");
    assert!(
        log.contains("pipeline removed from the configuration"),
        "{log}"
    );
    assert!(
        log.contains("plugin file unchanged"),
        "a reloaded its plugin: {log}"
    );

    // Every pipeline of the new set flows; the removed one does not.
    for (id, name) in [(1, "a"), (2, "b"), (3, "c"), (4, "d")] {
        db.exec(&format!("INSERT INTO {name}_docs VALUES ({id}, 'row')"))
            .await;
    }
    wait_until(Duration::from_secs(60), || async {
        ["a", "b", "d"]
            .iter()
            .all(|name| !replayed(&sink(name)).is_empty())
    })
    .await
    .unwrap_or_else(|error| panic!("a, b and d flow: {error}\n{}", host.log()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(replayed(&sink("c")).is_empty(), "c was stopped");
    assert!(
        host.terminate(HOST_RUN_TIMEOUT).await.unwrap().success(),
        "{}",
        host.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_watch_reloads_a_changed_plugin_file_and_a_changed_config_file() {
    let (db, folder, plugin, sink) = docs_with_v1(PgVersion::Pg18).await;
    db.exec("CREATE TABLE more_docs (id int PRIMARY KEY, content text);")
        .await;
    let docs = pipeline_block("docs", "docs", &plugin, &sink, "");
    let config = write_config(folder.path(), "", std::slice::from_ref(&docs));
    let port = free_port();
    let mut host = start_serve(&config, port, &db, true);
    host.wait_for_log(" streaming ", HOST_RUN_TIMEOUT)
        .await
        .expect("the pipeline streams");

    // The plugin file replaced: only a plugin reload, no config reload.
    deploy(&plugin_path("tagged-handler-v2"), &plugin);
    host.wait_for_log("plugin reloaded", Duration::from_secs(60))
        .await
        .expect("the replaced plugin file is reloaded");
    db.exec("INSERT INTO docs VALUES (1, 'one')").await;
    wait_until(Duration::from_secs(60), || async {
        replayed(&sink).get(&1).is_some_and(|(_, tag)| tag == "v2")
    })
    .await
    .unwrap_or_else(|error| panic!("v2 handles the change: {error}\n{}", host.log()));
    assert!(
        !host.log().contains("configuration applied"),
        "{}",
        host.log()
    );

    // The config file rewritten with a second pipeline: it starts, the first runs on.
    let more_sink = folder.path().join("more.jsonl");
    let more = pipeline_block("more", "more_docs", &plugin, &more_sink, "");
    write_config(folder.path(), "", &[docs, more]);
    host.wait_for_log(
        "configuration applied added=1 changed=0 removed=0",
        Duration::from_secs(60),
    )
    .await
    .expect("the changed config file is applied");
    wait_until(HOST_RUN_TIMEOUT, || async {
        streams(&host.log(), "more") == 1
    })
    .await
    .unwrap_or_else(|error| panic!("the new pipeline streams: {error}\n{}", host.log()));
    db.exec("INSERT INTO more_docs VALUES (2, 'two'); INSERT INTO docs VALUES (3, 'three');")
        .await;
    wait_until(Duration::from_secs(60), || async {
        replayed(&more_sink).contains_key(&2) && replayed(&sink).contains_key(&3)
    })
    .await
    .unwrap_or_else(|error| panic!("both pipelines flow: {error}\n{}", host.log()));
    assert_eq!(streams(&host.log(), "docs"), 1, "docs was not restarted");
    assert!(
        host.terminate(HOST_RUN_TIMEOUT).await.unwrap().success(),
        "{}",
        host.log()
    );
}
