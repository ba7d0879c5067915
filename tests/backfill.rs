//! Backfill end to end: rows that exist before the slot reach the sink through the pipeline's
//! own stream, with live changes going on, across a SIGKILL, with operator requests (`--where`,
//! pause, resume, cancel), on Postgres 15 (jsonl sink) and 18 (pgvector).
//!
//! Handlers embed through the fake OpenAI-compatible server, rate-limited with
//! `--embed-texts-per-second` so a backfill of a few thousand rows takes seconds: long enough
//! for concurrent writes, a kill or a pause to land in the middle of it.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use pgstream_e2e::tenants::jsonl;
use pgstream_e2e::{
    HostProcess, OpenAiServer, PgServer, PgVersion, TestDb, TestPipeline, fixture_path,
    plugin_path, wait_until,
};
use serde_json::Value as Json;
use tempfile::TempDir;

/// Generates one test per Postgres version for a scenario `async fn name(PgVersion)`.
macro_rules! on_both_versions {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn pg18() {
                super::$scenario(pgstream_e2e::PgVersion::Pg18).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn pg15() {
                super::$scenario(pgstream_e2e::PgVersion::Pg15).await;
            }
        }
    )*};
}

on_both_versions!(
    sigkill_mid_backfill_resumes_from_the_last_confirmed_chunk,
    old_handlers_receive_backfilled_rows_as_inserts,
    current_handlers_receive_backfilled_rows_as_reads,
    where_pause_resume_and_cancel_do_what_they_say,
    a_table_without_a_key_is_refused,
);

const LONG_WAIT: Duration = Duration::from_secs(180);

/// `docs (id int PRIMARY KEY, content text, title text)` with rows 1..=rows.
async fn docs_with_rows(db: &TestDb, rows: u32) {
    db.exec(&format!(
        "CREATE TABLE docs (id int PRIMARY KEY, content text, title text);
         INSERT INTO docs SELECT g, 'document ' || g || ' is about topic ' || (g % 97), 't' || g
         FROM generate_series(1, {rows}) g;"
    ))
    .await;
}

/// The embed-handler on `db.docs`, embedding through `server` at most `rate` texts/s.
fn embedding_pipeline<'a>(db: &'a TestDb, server: &OpenAiServer, rate: u32) -> TestPipeline<'a> {
    TestPipeline::new(db, "docs", "embed-handler")
        .with_args(&[
            "--embedder",
            "openai",
            "--openai-base-url",
            &server.base_url(),
            "--openai-model",
            OpenAiServer::MODEL,
            "--dimensions",
            &OpenAiServer::DIMENSIONS.to_string(),
            "--embed-texts-per-second",
            &rate.to_string(),
            "--batch-size",
            "250",
        ])
        .with_env("PGSTREAM_OPENAI_API_KEY", OpenAiServer::API_KEY)
        .without_env("OPENAI_API_KEY")
}

fn with_jsonl<'a>(pipeline: TestPipeline<'a>, path: &Path) -> TestPipeline<'a> {
    pipeline.with_args(&[
        "--sink".to_owned(),
        "jsonl".to_owned(),
        "--collection".to_owned(),
        path.display().to_string(),
    ])
}

/// The backfill of `docs` as stored: (state, rows done).
async fn backfill_state(db: &TestDb, slot: &str) -> Option<(String, i64)> {
    db.client()
        .query_opt(
            "SELECT state, rows_done FROM pgstream_backfills
             WHERE slot = $1 AND table_name = 'docs'",
            &[&slot],
        )
        .await
        .ok()
        .flatten()
        .map(|row| (row.get(0), row.get(1)))
}

async fn wait_for_state(db: &TestDb, slot: &str, state: &str, host: &HostProcess) {
    wait_until(LONG_WAIT, || async {
        backfill_state(db, slot)
            .await
            .is_some_and(|(now, _)| now == state)
    })
    .await
    .unwrap_or_else(|error| panic!("backfill never {state}: {error}\n{}", host.log()));
}

/// Runs `pgstream-host backfill <args>` for `pipeline` to its end.
async fn backfill_cli(pipeline: &TestPipeline<'_>, args: &[&str]) -> std::process::Output {
    let mut command = pipeline.command(Some("backfill"), args);
    command.stdin(std::process::Stdio::null());
    command.output().await.expect("run pgstream-host backfill")
}

/// The sink's points after replaying a jsonl file: key -> (vector, payload).
fn replayed(path: &Path) -> BTreeMap<i64, (Option<Vec<f32>>, Json)> {
    let mut points = BTreeMap::new();
    for line in jsonl(path) {
        let key: i64 = line["key"][0]
            .as_str()
            .and_then(|key| key.parse().ok())
            .expect("an integer key");
        match line["op"].as_str() {
            Some("upsert") => {
                let vector = line["vector"].as_array().map(|values| {
                    values
                        .iter()
                        .map(|value| value.as_f64().unwrap() as f32)
                        .collect()
                });
                let previous = points.remove(&key).and_then(|(vector, _)| vector);
                points.insert(key, (vector.or(previous), line["payload"].clone()));
            }
            Some("delete") => {
                points.remove(&key);
            }
            other => panic!("unexpected jsonl line {other:?}"),
        }
    }
    points
}

/// `docs` as (id -> content).
async fn source_rows(db: &TestDb) -> BTreeMap<i64, String> {
    db.client()
        .query("SELECT id::bigint, content FROM docs", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

fn assert_vector(stored: &[f32], text: &str, id: i64) {
    let expected = OpenAiServer::vector(text, OpenAiServer::DIMENSIONS);
    let worst = stored
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        stored.len() == expected.len() && worst < 1e-5,
        "row {id}: the vector is not the one of its current text {text:?}"
    );
}

/// 10,000 existing rows, with inserts, updates and deletes going on during the backfill: at
/// the end the pgvector table equals the source table (keys, and vectors of the current text).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_rows_with_concurrent_writes_end_equal_to_the_table() {
    let db = PgServer::shared(PgVersion::Pg18).create_database().await;
    db.create_vector_extension().await;
    docs_with_rows(&db, 10_000).await;
    let server = OpenAiServer::start().await;
    let pipeline = embedding_pipeline(&db, &server, 2_000).with_args(&["--sink", "pgvector"]);
    let slot = db.unique_name("pgstream");
    let pipeline = pipeline.with_slot(&slot);
    let mut host = pipeline.start_streaming().await;

    // Writes while the backfill runs: every tenth statement a delete, else inserts of new
    // rows and updates of existing ones, each in its own transaction.
    let writer = db.connect().await;
    let mut step = 0u32;
    let mut during_backfill = 0;
    loop {
        let state = backfill_state(&db, &slot).await;
        let running = !matches!(&state, Some((state, _)) if state == "done");
        if !running && during_backfill > 0 {
            break;
        }
        step += 1;
        let id = (step * 7919) % 10_000 + 1;
        let sql = match step % 10 {
            0 => format!("DELETE FROM docs WHERE id = {id}"),
            1 | 4 | 7 => format!(
                "INSERT INTO docs VALUES ({}, 'inserted during backfill {step}', 'new')",
                20_000 + step
            ),
            _ => format!("UPDATE docs SET content = 'revised {step} of {id}' WHERE id = {id}"),
        };
        writer.batch_execute(&sql).await.unwrap();
        if running && state.is_some() {
            during_backfill += 1;
        }
        assert!(step < 200_000, "the backfill never ended:\n{}", host.log());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(
        during_backfill >= 50,
        "only {during_backfill} writes overlapped the backfill"
    );

    let source = source_rows(&db).await;
    wait_until(LONG_WAIT, || async {
        let stored = stored_vectors(&db).await;
        stored.len() == source.len() && stored.keys().eq(source.keys())
    })
    .await
    .unwrap_or_else(|error| {
        panic!(
            "the vector table never matched the table: {error}\n{}",
            host.log()
        )
    });
    // Let anything still in flight land, then compare every vector.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stored = stored_vectors(&db).await;
    assert_eq!(
        stored.keys().collect::<Vec<_>>(),
        source.keys().collect::<Vec<_>>(),
        "the vector table holds exactly the source rows"
    );
    for (id, content) in &source {
        assert_vector(&stored[id], content, *id);
    }
    let log = host.log();
    assert!(log.contains("backfill done"), "{log}");
    host.terminate(Duration::from_secs(30)).await.unwrap();
}

async fn stored_vectors(db: &TestDb) -> BTreeMap<i64, Vec<f32>> {
    db.client()
        .query(
            "SELECT source_key[1]::bigint, embedding::real[] FROM docs_embeddings",
            &[],
        )
        .await
        .map(|rows| rows.iter().map(|row| (row.get(0), row.get(1))).collect())
        .unwrap_or_default()
}

/// An update that leaves a TOASTed embedded column `unchanged` while its row's chunk is being
/// read: the point still gets the vector of that text (from the chunk), and the new title.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_toasted_text_updated_inside_the_chunk_window_keeps_its_vector() {
    let db = PgServer::shared(PgVersion::Pg18).create_database().await;
    db.create_vector_extension().await;
    db.exec(
        "CREATE TABLE docs (id int PRIMARY KEY, content text, title text);
         ALTER TABLE docs ALTER COLUMN content SET STORAGE EXTERNAL;
         INSERT INTO docs SELECT g, repeat('long toasted text ' || g || ' ', 400), 'old'
         FROM generate_series(1, 5) g;",
    )
    .await;
    let server = OpenAiServer::start().await;
    let slot = db.unique_name("pgstream");
    let pipeline = embedding_pipeline(&db, &server, 10_000)
        .with_args(&["--sink", "pgvector"])
        .with_slot(&slot)
        // Holds the chunk's window open for 4 s after its rows were read.
        .with_env("PGSTREAM_BACKFILL_WINDOW_DELAY_MS", "4000");
    let mut host = pipeline.start();
    host.wait_for_log("backfill started", LONG_WAIT)
        .await
        .unwrap_or_else(|error| panic!("{error}\n{}", host.log()));
    // The chunk is being read now: this update commits inside its window, and Postgres sends
    // the TOASTed content as unchanged.
    tokio::time::sleep(Duration::from_millis(500)).await;
    db.exec("UPDATE docs SET title = 'renamed' WHERE id = 2")
        .await;
    wait_for_state(&db, &slot, "done", &host).await;
    let source = source_rows(&db).await;
    wait_until(LONG_WAIT, || async { stored_vectors(&db).await.len() == 5 })
        .await
        .unwrap_or_else(|error| panic!("not every row was stored: {error}\n{}", host.log()));
    let stored = stored_vectors(&db).await;
    for (id, content) in &source {
        assert_vector(&stored[id], content, *id);
    }
    let title: Json = db
        .client()
        .query_one(
            "SELECT payload FROM docs_embeddings WHERE source_key[1] = '2'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(title["title"], "renamed", "{title}");
    host.terminate(Duration::from_secs(30)).await.unwrap();
}

async fn sigkill_mid_backfill_resumes_from_the_last_confirmed_chunk(version: PgVersion) {
    let db = PgServer::shared(version).create_database().await;
    docs_with_rows(&db, 30_000).await;
    let server = OpenAiServer::start().await;
    let out = TempDir::new().unwrap();
    let sink = out.path().join("points.jsonl");
    let slot = db.unique_name("pgstream");
    let pipeline = with_jsonl(embedding_pipeline(&db, &server, 3_000), &sink).with_slot(&slot);
    let mut host = pipeline.start();
    wait_until(LONG_WAIT, || async {
        backfill_state(&db, &slot)
            .await
            .is_some_and(|(_, done)| done >= 5_000)
    })
    .await
    .unwrap_or_else(|error| panic!("no confirmed chunk: {error}\n{}", host.log()));
    host.kill().await.unwrap();
    let (state, done_at_kill) = backfill_state(&db, &slot).await.unwrap();
    assert_eq!(
        state, "running",
        "killed after the end: make the backfill slower"
    );
    let lines_at_kill = jsonl(&sink).len();

    let mut restarted = pipeline.start();
    wait_for_state(&db, &slot, "done", &restarted).await;
    let log = restarted.log();
    assert!(
        log.contains("backfill resumed from its last confirmed chunk"),
        "{log}"
    );
    wait_until(LONG_WAIT, || async { replayed(&sink).len() == 30_000 })
        .await
        .unwrap_or_else(|error| panic!("not every row arrived: {error}\n{}", restarted.log()));
    // Nothing at or below the confirmed cursor was read again: rows are read in key order,
    // so the first `done_at_kill` ids were confirmed.
    let reread: Vec<i64> = jsonl(&sink)[lines_at_kill..]
        .iter()
        .filter_map(|line| line["key"][0].as_str()?.parse().ok())
        .filter(|id: &i64| *id <= done_at_kill)
        .collect();
    assert!(
        reread.is_empty(),
        "{} rows of confirmed chunks were read again after the restart (first {:?})",
        reread.len(),
        reread.first()
    );
    let points = replayed(&sink);
    let source = source_rows(&db).await;
    assert!(points.keys().eq(source.keys()));
    for (id, content) in source.iter().step_by(997) {
        assert_vector(points[id].0.as_ref().expect("a vector"), content, *id);
    }
    restarted.terminate(Duration::from_secs(30)).await.unwrap();
}

/// The echo handler built against pgstream:handler@0.1.0 (kept as it was, in
/// tests/fixtures), which has no `read`, gets backfilled rows as inserts.
async fn old_handlers_receive_backfilled_rows_as_inserts(version: PgVersion) {
    backfilled_rows_reach_the_echo_handler_as(
        version,
        &fixture_path("handler-0.1.0/echo-handler.wasm"),
        "insert",
    )
    .await;
}

/// The echo handler built against the current WIT gets them as `read`.
async fn current_handlers_receive_backfilled_rows_as_reads(version: PgVersion) {
    backfilled_rows_reach_the_echo_handler_as(version, &plugin_path("echo-handler"), "read").await;
}

async fn backfilled_rows_reach_the_echo_handler_as(
    version: PgVersion,
    plugin: &Path,
    operation: &str,
) {
    let db = PgServer::shared(version).create_database().await;
    db.exec(
        "CREATE TABLE notes (id int PRIMARY KEY, body text);
         INSERT INTO notes SELECT g, 'note ' || g FROM generate_series(1, 50) g;",
    )
    .await;
    let out = TempDir::new().unwrap();
    let sink = out.path().join("echo.jsonl");
    let slot = db.unique_name("pgstream");
    let pipeline = with_jsonl(
        TestPipeline::new(&db, "notes", "echo-handler")
            .with_plugin_file(plugin)
            .with_args(&["--embedder", "none"]),
        &sink,
    )
    .with_slot(&slot);
    let mut host = pipeline.start();
    host.wait_for_log("backfill done", LONG_WAIT)
        .await
        .unwrap_or_else(|error| panic!("{error}\n{}", host.log()));
    wait_until(LONG_WAIT, || async { jsonl(&sink).len() >= 50 })
        .await
        .unwrap_or_else(|error| panic!("{error}\n{}", host.log()));
    let events: Vec<Json> = jsonl(&sink)
        .into_iter()
        .map(|line| line["payload"].clone())
        .collect();
    assert_eq!(events.len(), 50);
    let mut ids: Vec<String> = Vec::new();
    for event in &events {
        assert_eq!(event["operation"], operation, "{event}");
        assert_eq!(event["table"], "notes");
        ids.push(
            event["row"][0]["value"]["text"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let expected: Vec<String> = (1..=50).map(|id| id.to_string()).collect();
    assert_eq!(ids, expected, "every row once, in key order");
    host.terminate(Duration::from_secs(30)).await.unwrap();
}

async fn where_pause_resume_and_cancel_do_what_they_say(version: PgVersion) {
    let db = PgServer::shared(version).create_database().await;
    docs_with_rows(&db, 20_000).await;
    let server = OpenAiServer::start().await;
    let out = TempDir::new().unwrap();
    let sink = out.path().join("points.jsonl");
    let slot = db.unique_name("pgstream");
    let pipeline = with_jsonl(embedding_pipeline(&db, &server, 2_000), &sink)
        .with_slot(&slot)
        .with_args(&["--backfill", "skip"]);
    let mut host = pipeline.start_streaming().await;
    assert_eq!(backfill_state(&db, &slot).await, None, "--backfill skip");
    let cli = |args: &'static [&'static str]| backfill_cli(&pipeline, args);

    // --where re-delivers only the matching rows.
    let requested = cli(&["--where", "id % 10 = 0"]).await;
    assert!(requested.status.success(), "{requested:?}");
    wait_for_state(&db, &slot, "done", &host).await;
    wait_until(LONG_WAIT, || async { replayed(&sink).len() == 2_000 })
        .await
        .unwrap_or_else(|error| panic!("{error}\n{}", host.log()));
    assert!(replayed(&sink).keys().all(|id| id % 10 == 0));
    assert_eq!(backfill_state(&db, &slot).await.unwrap().1, 2_000);

    // A second request while one is active is refused; pause holds it, resume finishes it.
    assert!(cli(&[]).await.status.success());
    wait_until(LONG_WAIT, || async {
        backfill_state(&db, &slot)
            .await
            .is_some_and(|(state, done)| state == "running" && done > 0)
    })
    .await
    .unwrap_or_else(|error| panic!("{error}\n{}", host.log()));
    let refused = cli(&[]).await;
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("already running"),
        "{refused:?}"
    );
    let paused = cli(&["--pause"]).await;
    assert!(paused.status.success(), "{paused:?}");
    assert!(String::from_utf8_lossy(&paused.stdout).contains("paused"));
    // The chunk in flight finishes; then nothing moves.
    host.wait_for_log("backfill paused;", LONG_WAIT)
        .await
        .unwrap_or_else(|error| panic!("{error}\n{}", host.log()));
    let (state, done) = backfill_state(&db, &slot).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        backfill_state(&db, &slot).await.unwrap(),
        (state.clone(), done)
    );
    assert_eq!(state, "paused");
    assert!(
        done < 20_000,
        "paused after the end: make the backfill slower"
    );
    let status = cli(&["--status"]).await;
    let status_text = String::from_utf8_lossy(&status.stdout);
    assert!(
        status_text.contains("public.docs: paused") && status_text.contains(&format!("{done}/")),
        "{status_text}"
    );
    assert!(cli(&["--resume"]).await.status.success());
    wait_for_state(&db, &slot, "done", &host).await;
    assert_eq!(backfill_state(&db, &slot).await.unwrap().1, 20_000);

    // Cancel stops it for good.
    assert!(cli(&[]).await.status.success());
    wait_until(LONG_WAIT, || async {
        backfill_state(&db, &slot)
            .await
            .is_some_and(|(state, done)| state == "running" && done > 0)
    })
    .await
    .unwrap();
    assert!(cli(&["--cancel"]).await.status.success());
    host.wait_for_log("backfill cancelled", LONG_WAIT)
        .await
        .unwrap_or_else(|error| panic!("{error}\n{}", host.log()));
    let (state, done) = backfill_state(&db, &slot).await.unwrap();
    assert_eq!(state, "cancelled");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(backfill_state(&db, &slot).await.unwrap().1, done);
    assert!(done < 20_000);
    assert!(
        !cli(&["--resume"]).await.status.success(),
        "a cancelled backfill does not resume"
    );
    host.terminate(Duration::from_secs(30)).await.unwrap();
}

async fn a_table_without_a_key_is_refused(version: PgVersion) {
    let db = PgServer::shared(version).create_database().await;
    db.exec(
        "CREATE TABLE docs (id int, content text);
         ALTER TABLE docs REPLICA IDENTITY FULL;
         INSERT INTO docs VALUES (1, 'one'), (2, 'two');",
    )
    .await;
    let out = TempDir::new().unwrap();
    let sink = out.path().join("points.jsonl");
    let slot = db.unique_name("pgstream");
    let pipeline = with_jsonl(
        TestPipeline::new(&db, "docs", "tagged-handler-v1").with_args(&["--embedder", "none"]),
        &sink,
    )
    .with_slot(&slot);
    // The request is refused at once, with what to do.
    let output = backfill_cli(&pipeline, &[]).await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("has no primary key and no replica identity index")
            && stderr.contains("add a primary key"),
        "{stderr}"
    );
    // The initial backfill of a first start fails the same way, visibly, and the live stream
    // goes on.
    let mut host = pipeline.start_streaming().await;
    host.wait_for_log("backfill failed", LONG_WAIT)
        .await
        .unwrap_or_else(|error| panic!("{error}\n{}", host.log()));
    db.exec("INSERT INTO docs VALUES (3, 'three')").await;
    wait_until(LONG_WAIT, || async {
        jsonl(&sink).iter().any(|line| line["payload"]["id"] == 3)
    })
    .await
    .unwrap_or_else(|error| panic!("{error}\n{}", host.log()));
    let status = backfill_cli(&pipeline, &["--status"]).await;
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("public.docs: failed"),
        "{status:?}"
    );
    host.terminate(Duration::from_secs(30)).await.unwrap();
}

/// Re-embedding by backfill: with `--embed-cache`, a second backfill of unchanged rows sends
/// the embedding server nothing, and still re-delivers every row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_backfill_with_the_embed_cache_asks_the_model_nothing() {
    let db = PgServer::shared(PgVersion::Pg18).create_database().await;
    docs_with_rows(&db, 500).await;
    let server = OpenAiServer::start().await;
    let out = TempDir::new().unwrap();
    let sink = out.path().join("points.jsonl");
    let cache = out.path().join("embeddings.redb");
    let slot = db.unique_name("pgstream");
    let pipeline = with_jsonl(embedding_pipeline(&db, &server, 100_000), &sink)
        .with_slot(&slot)
        .with_args(&["--embed-cache".to_owned(), cache.display().to_string()]);
    let mut host = pipeline.start();
    wait_for_state(&db, &slot, "done", &host).await;
    assert_eq!(
        server.input_count(),
        500,
        "the first backfill embeds every row"
    );
    server.clear();

    let requested = backfill_cli(&pipeline, &[]).await;
    assert!(requested.status.success(), "{requested:?}");
    wait_until(LONG_WAIT, || async {
        host.log().matches("backfill done").count() == 2
    })
    .await
    .unwrap_or_else(|error| panic!("{error}\n{}", host.log()));
    wait_until(LONG_WAIT, || async {
        jsonl(&sink)
            .iter()
            .filter(|line| line["op"] == "upsert")
            .count()
            == 1_000
    })
    .await
    .unwrap_or_else(|error| panic!("{error}\n{}", host.log()));
    assert_eq!(
        server.input_count(),
        0,
        "cached texts cost no model request"
    );
    host.terminate(Duration::from_secs(30)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg15_a_backfill_waits_while_the_slot_is_near_its_wal_budget() {
    backfill_waits_for_wal_room(PgVersion::Pg15).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg18_a_backfill_waits_while_the_slot_is_near_its_wal_budget() {
    backfill_waits_for_wal_room(PgVersion::Pg18).await;
}

/// The slot's WAL as the backfill reader judges it: retained bytes over what it may retain.
async fn wal_budget_share(db: &TestDb, slot: &str) -> (f64, String) {
    let row = db
        .client()
        .query_one(
            "SELECT (pg_current_wal_lsn() - restart_lsn)::float8, safe_wal_size::float8, wal_status
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap();
    let (retained, safe): (f64, f64) = (row.get(0), row.get(1));
    (retained / (retained + safe.max(0.0)), row.get(2))
}

/// A transaction left open elsewhere keeps the slot's restart point where it is, however far
/// the pipeline confirms: WAL piles up. Before reading a chunk the backfill looks at the slot,
/// and above 80% of `max_slot_wal_keep_size` it waits instead of adding to the pile; once the
/// transaction ends and the slot lets go, it goes on and completes.
async fn backfill_waits_for_wal_room(version: PgVersion) {
    // A server of its own: the keep size would put every other test's slots at risk.
    let server = PgServer::start(version).expect("start a server");
    let admin = server.superuser_client().await;
    admin
        .simple_query("ALTER SYSTEM SET max_slot_wal_keep_size = '128MB'")
        .await
        .unwrap();
    admin.simple_query("SELECT pg_reload_conf()").await.unwrap();
    let db = server.create_database().await;
    // No `content` column: the echo handler embeds none, and the pipeline has no embedder.
    db.exec(
        "CREATE TABLE docs (id int PRIMARY KEY, body text);
         INSERT INTO docs SELECT g, 'note ' || g FROM generate_series(1, 3000) g;
         CREATE TABLE filler (x text);",
    )
    .await;
    let out = TempDir::new().unwrap();
    let sink = out.path().join("echo.jsonl");
    let slot = db.unique_name("pgstream");
    let pipeline = with_jsonl(
        TestPipeline::new(&db, "docs", "echo-handler").with_args(&["--embedder", "none"]),
        &sink,
    )
    .with_slot(&slot);
    pipeline.setup().await;
    assert_eq!(
        backfill_state(&db, &slot).await,
        Some(("pending".to_owned(), 0))
    );

    // The open transaction has written, so it has an xid the slot's restart point waits for.
    let blocker = db.connect().await;
    blocker
        .batch_execute("BEGIN; INSERT INTO filler VALUES ('held open')")
        .await
        .unwrap();
    let mut share = 0.0;
    while share < 0.84 {
        db.exec(
            "INSERT INTO filler SELECT repeat(md5(g::text), 32) FROM generate_series(1, 4000) g",
        )
        .await;
        let status;
        (share, status) = wal_budget_share(&db, &slot).await;
        assert!(
            status == "reserved" || status == "extended",
            "the test must not lose the slot: {status} at share {share:.2}"
        );
    }

    let mut host = pipeline.start();
    host.wait_for_log("backfill waiting", LONG_WAIT)
        .await
        .unwrap_or_else(|error| panic!("the backfill waits: {error}\n{}", host.log()));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        backfill_state(&db, &slot).await.map(|(_, rows)| rows),
        Some(0),
        "no chunk is read while the slot is near its budget"
    );

    // The transaction ends; a checkpoint logs the running transactions, the pipeline confirms
    // past them, and the slot lets its WAL go.
    blocker.batch_execute("ROLLBACK").await.unwrap();
    db.exec("CHECKPOINT").await;
    host.wait_for_log("backfill going on", LONG_WAIT)
        .await
        .unwrap_or_else(|error| panic!("the backfill goes on: {error}\n{}", host.log()));
    wait_for_state(&db, &slot, "done", &host).await;
    wait_until(LONG_WAIT, || async { jsonl(&sink).len() >= 3_000 })
        .await
        .unwrap_or_else(|error| panic!("{error}\n{}", host.log()));
    host.terminate(Duration::from_secs(30)).await.unwrap();
}
