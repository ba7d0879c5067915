//! The embedding cache end to end: the real host with `--embed-cache`, the real MiniLM model,
//! the `embed-handler` component and pgvector on Postgres 18. What a user pays for at-least-once
//! delivery is re-embedding what was already embedded; these tests replay changes (a copied
//! slot, a SIGKILL and restart) and read the host's own log summary to check that the model
//! computed no text twice, and read pgvector to check the vectors are still right. One test
//! counts from the other side: with the OpenAI-compatible embedder, the fake embedding server
//! records every request, and a replay must send it none.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use pgstream_e2e::{
    OpenAiServer, PgServer, PgVersion, TestDb, TestPipeline, model_dir, wait_until,
};
use pgstream_host::embed::{Embedder, MiniLmEmbedder, MiniLmOptions};
use tempfile::TempDir;

/// A pgvector pipeline on `table` of `db` whose vectors are cached in the file `cache`.
fn cached_pipeline<'a>(db: &'a TestDb, table: &str, cache: &Path) -> TestPipeline<'a> {
    TestPipeline::new(db, table, "embed-handler").with_args(&[
        "--sink".to_owned(),
        "pgvector".to_owned(),
        "--embed-cache".to_owned(),
        cache.display().to_string(),
    ])
}

/// The counters of the host's final `embedding cache` log line (`hits=.. misses=..
/// texts_embedded=.. model_requests=.. evictions=..`).
fn cache_summary(log: &str) -> HashMap<String, f64> {
    let line = log
        .lines()
        .rfind(|line| line.contains("embedding cache") && line.contains("texts_embedded="))
        .unwrap_or_else(|| panic!("no embedding cache summary in the log:\n{log}"));
    line.split_whitespace()
        .filter_map(|field| field.split_once('='))
        .filter_map(|(name, value)| Some((name.to_owned(), value.parse().ok()?)))
        .collect()
}

/// `source_key[1]` -> embedding of every point in `<table>_embeddings`.
async fn stored_vectors(db: &TestDb, table: &str) -> BTreeMap<i64, Vec<f32>> {
    db.client()
        .query(
            &format!("SELECT source_key[1]::bigint, embedding::real[] FROM {table}_embeddings"),
            &[],
        )
        .await
        .expect("read the vector table")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// Checks the stored vectors of every row (`id` -> content) against the model, in-test.
async fn assert_vectors_match_model(db: &TestDb, table: &str, rows: &BTreeMap<i64, String>) {
    let stored = stored_vectors(db, table).await;
    assert_eq!(
        stored.keys().collect::<Vec<_>>(),
        rows.keys().collect::<Vec<_>>(),
        "the vector table holds exactly the source rows"
    );
    let model = MiniLmEmbedder::load(&model_dir(), MiniLmOptions::default()).expect("model loads");
    let texts: Vec<String> = rows.values().cloned().collect();
    let expected = model.embed(&texts).await.expect("embeds");
    for ((id, vector), expected) in stored.iter().zip(&expected) {
        let worst = vector
            .iter()
            .zip(expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-5, "vector of row {id} is off by {worst}");
    }
}

async fn source_rows(db: &TestDb, table: &str) -> BTreeMap<i64, String> {
    db.client()
        .query(&format!("SELECT id::bigint, content FROM {table}"), &[])
        .await
        .expect("read the source")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// The deterministic replay: a copy of the slot made before the host ran still points before
/// the changes, so running the host on it delivers the same changes again, as after a crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_a_slot_makes_no_model_call_for_texts_already_embedded() {
    let db = PgServer::shared(PgVersion::Pg18).create_database().await;
    db.create_vector_extension().await;
    db.exec("CREATE TABLE docs (id int PRIMARY KEY, content text);")
        .await;
    let out = TempDir::new().unwrap();
    let cache = out.path().join("embeddings.redb");
    let first_slot = db.unique_name("first");
    let replay_slot = db.unique_name("replay");
    let first = cached_pipeline(&db, "docs", &cache).with_slot(&first_slot);
    let replay = cached_pipeline(&db, "docs", &cache).with_slot(&replay_slot);
    first.setup().await;

    // 300 rows with 250 distinct texts, in three transactions, and an update of ids 1-20 that
    // writes their content back unchanged.
    db.exec(
        "INSERT INTO docs SELECT g, 'document ' || (g % 250) || ' on topic ' || (g % 250 % 13)
           FROM generate_series(1, 100) g;
         INSERT INTO docs SELECT g, 'document ' || (g % 250) || ' on topic ' || (g % 250 % 13)
           FROM generate_series(101, 200) g;
         INSERT INTO docs SELECT g, 'document ' || (g % 250) || ' on topic ' || (g % 250 % 13)
           FROM generate_series(201, 300) g;
         UPDATE docs SET content = content WHERE id <= 20;",
    )
    .await;
    db.client()
        .execute(
            "SELECT pg_copy_logical_replication_slot($1, $2)",
            &[&first_slot, &replay_slot],
        )
        .await
        .expect("copy the slot");
    let end = db.current_lsn().await;

    let log = first.run_to_exit(None, &["--stop-at-lsn", &end]).await;
    let stats = cache_summary(&log);
    assert_eq!(
        stats["texts_embedded"], 250.0,
        "the first run embeds each distinct text once:\n{log}"
    );
    // The handler sends 300 to 320 texts: an update in the same batch as its row's insert
    // supersedes it.
    assert!(stats["hits"] + stats["misses"] >= 300.0, "{log}");
    let rows = source_rows(&db, "docs").await;
    assert_vectors_match_model(&db, "docs", &rows).await;

    // Lose the vector table, then replay every change from the copied slot.
    db.exec("DELETE FROM docs_embeddings;").await;
    let log = replay.run_to_exit(None, &["--stop-at-lsn", &end]).await;
    let stats = cache_summary(&log);
    assert_eq!(
        stats["texts_embedded"], 0.0,
        "the replay embedded texts:\n{log}"
    );
    assert_eq!(
        stats["model_requests"], 0.0,
        "the replay called the model:\n{log}"
    );
    assert_eq!(stats["misses"], 0.0, "{log}");
    assert!(stats["hits"] >= 300.0, "{log}");
    assert_eq!(stats["hit_rate"], 1.0, "{log}");
    assert_vectors_match_model(&db, "docs", &rows).await;
}

/// A crash: SIGKILL while the host is part-way through, then a restart to the end. The rows
/// carry 2,000 distinct texts, each twice (rows n and n + 2,000). Every text whose vector had
/// reached pgvector before the kill was embedded (and cached) by the killed run, so the
/// restart embeds only texts never embedded, each once, however far back it replays; without
/// the cache it would embed every row after the last confirmed position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_after_sigkill_embeds_only_texts_not_embedded_before() {
    const ROWS: i64 = 4_000;
    const DISTINCT: i64 = 2_000;
    let db = PgServer::shared(PgVersion::Pg18).create_database().await;
    db.create_vector_extension().await;
    db.exec("CREATE TABLE items (id int PRIMARY KEY, content text);")
        .await;
    let out = TempDir::new().unwrap();
    let cache = out.path().join("embeddings.redb");
    let pipeline = cached_pipeline(&db, "items", &cache).with_args(&["--batch-size", "100"]);
    pipeline.setup().await;

    for start in (1..=ROWS).step_by(100) {
        db.exec(&format!(
                "INSERT INTO items
                   SELECT g, 'item ' || (g % {DISTINCT}) || ' is about subject ' || (g % {DISTINCT} % 89)
                   FROM generate_series({start}, {}) g",
                start + 99
            ),
        )
        .await;
    }
    let end = db.current_lsn().await;

    let mut host = pipeline.start();
    wait_until(Duration::from_secs(240), || async {
        db.client()
            .query_one("SELECT count(*) FROM items_embeddings", &[])
            .await
            .map(|row| row.get::<_, i64>(0) >= 500)
            .unwrap_or(false)
    })
    .await
    .unwrap_or_else(|error| panic!("no progress: {error}\n{}", host.log()));
    host.kill().await.unwrap();
    let stored_at_kill: i64 = db
        .client()
        .query_one("SELECT count(*) FROM items_embeddings", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        stored_at_kill < DISTINCT,
        "the host got past the first copy of every text before the kill"
    );

    let log = pipeline.run_to_exit(None, &["--stop-at-lsn", &end]).await;
    let stats = cache_summary(&log);
    assert!(
        stats["texts_embedded"] <= (DISTINCT - stored_at_kill) as f64,
        "{stored_at_kill} rows (distinct texts) were stored before the kill, yet the restart \
         embedded {} texts of {DISTINCT} distinct ones:\n{log}",
        stats["texts_embedded"]
    );
    assert!(
        stats["hits"] >= (ROWS - DISTINCT) as f64,
        "the second copy of every text must come from the cache:\n{log}"
    );
    let rows = source_rows(&db, "items").await;
    assert_eq!(rows.len() as i64, ROWS);
    let sample: BTreeMap<i64, String> = rows.into_iter().step_by(40).collect();
    let stored = stored_vectors(&db, "items").await;
    assert_eq!(
        stored.len() as i64,
        ROWS,
        "the vector table holds every row"
    );
    let model = MiniLmEmbedder::load(&model_dir(), MiniLmOptions::default()).expect("model loads");
    let texts: Vec<String> = sample.values().cloned().collect();
    let expected = model.embed(&texts).await.expect("embeds");
    for ((id, _), expected) in sample.iter().zip(&expected) {
        let worst = stored[id]
            .iter()
            .zip(expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-5, "vector of item {id} is off by {worst}");
    }
}

/// The replay seen from the embedding server: the same copied-slot replay with the
/// OpenAI-compatible embedder (the in-process fake server, which records every request). The
/// first run asks the server for every distinct text; the replay sends it nothing at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_sends_the_embedding_server_no_request() {
    let server = OpenAiServer::start().await;
    let db = PgServer::shared(PgVersion::Pg18).create_database().await;
    db.create_vector_extension().await;
    db.exec("CREATE TABLE docs (id int PRIMARY KEY, content text);")
        .await;
    let out = TempDir::new().unwrap();
    let cache = out.path().join("embeddings.redb");
    let first_slot = db.unique_name("first");
    let replay_slot = db.unique_name("replay");
    let with_server = |slot: &str| {
        // The pipeline names the local model too; the server's embedder ignores --model-dir.
        cached_pipeline(&db, "docs", &cache)
            .with_slot(slot)
            .with_args(&[
                "--embedder",
                "openai",
                "--openai-base-url",
                &server.base_url(),
                "--openai-model",
                OpenAiServer::MODEL,
                // Known size: no probe request at start, so every request is an embedding.
                "--dimensions",
                &OpenAiServer::DIMENSIONS.to_string(),
            ])
            .with_env("PGSTREAM_OPENAI_API_KEY", OpenAiServer::API_KEY)
            .without_env("OPENAI_API_KEY")
    };
    let first = with_server(&first_slot);
    let replay = with_server(&replay_slot);
    first.setup().await;
    db.exec(
        "INSERT INTO docs SELECT g, 'note ' || (g % 80) FROM generate_series(1, 120) g;
         UPDATE docs SET content = 'revised note ' || id WHERE id <= 10;",
    )
    .await;
    db.client()
        .execute(
            "SELECT pg_copy_logical_replication_slot($1, $2)",
            &[&first_slot, &replay_slot],
        )
        .await
        .expect("copy the slot");
    let end = db.current_lsn().await;

    let stop_at = ["--stop-at-lsn", &end];
    first.run_to_exit(None, &stop_at).await;
    let first_inputs: usize = server
        .requests()
        .iter()
        .filter(|request| request.status == 200)
        .map(|request| request.inputs.len())
        .sum();
    assert!(first_inputs > 0, "the first run asked the server nothing");
    // 80 distinct notes and 10 revised ones: each sent once.
    assert!(
        first_inputs <= 90,
        "{first_inputs} texts sent for 90 distinct ones"
    );

    server.clear();
    db.exec("DELETE FROM docs_embeddings;").await;
    let log = replay.run_to_exit(None, &stop_at).await;
    assert_eq!(
        server.request_count(),
        0,
        "the replay asked the embedding server for texts it had embedded before: {:?}\n{log}",
        server
            .requests()
            .iter()
            .map(|request| &request.inputs)
            .collect::<Vec<_>>()
    );
    let rows: Vec<(i64, String)> = db
        .client()
        .query("SELECT id::bigint, content FROM docs ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let stored = stored_vectors(&db, "docs").await;
    assert_eq!(stored.len(), rows.len(), "every row has its point again");
    for (id, content) in rows {
        assert_eq!(
            stored[&id],
            OpenAiServer::vector(&content, OpenAiServer::DIMENSIONS),
            "vector of row {id}"
        );
    }
}
