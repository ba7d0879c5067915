//! The dead-letter queue (`--on-failure dead-letter`): one event the handler cannot handle no
//! longer blocks its pipeline. The pipeline finds it by splitting its batch, records it in
//! `pgstream_dead_letters`, handles every other event and confirms past it; `dead-letters
//! list|replay|purge` show it, run it through a fixed handler, or drop it.

use std::path::Path;
use std::time::Duration;

use pgstream_e2e::tenants::{jsonl, upserted_ids};
use pgstream_e2e::{
    HostProcess, OpenAiServer, PgServer, PgVersion, TestDb, TestPipeline, plugin_path,
};
use tempfile::TempDir;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg15_one_poison_row_among_1000_is_dead_lettered_and_replayed_after_a_fix() {
    one_poison_row_among_1000(PgVersion::Pg15).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg18_one_poison_row_among_1000_is_dead_lettered_and_replayed_after_a_fix() {
    one_poison_row_among_1000(PgVersion::Pg18).await;
}

fn dead_letter_pipeline<'a>(db: &'a TestDb, slot: &str, sink: &Path) -> TestPipeline<'a> {
    TestPipeline::new(db, "items", "poison-handler")
        .with_slot(slot)
        .with_args(&[
            "--embedder".to_owned(),
            "none".to_owned(),
            "--sink".to_owned(),
            "jsonl".to_owned(),
            "--collection".to_owned(),
            sink.display().to_string(),
            "--backfill".to_owned(),
            "skip".to_owned(),
            "--batch-size".to_owned(),
            "1000".to_owned(),
            "--max-attempts".to_owned(),
            "2".to_owned(),
            "--retry-backoff-ms".to_owned(),
            "10".to_owned(),
            "--on-failure".to_owned(),
            "dead-letter".to_owned(),
        ])
}

/// The dead letters of `slot`: (lsn, error, attempts, key).
async fn stored(db: &TestDb, slot: &str) -> Vec<(String, String, i32, String)> {
    let exists: bool = db
        .client()
        .query_one(
            "SELECT to_regclass('pgstream_dead_letters') IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    if !exists {
        return Vec::new();
    }
    db.client()
        .query(
            "SELECT lsn::text, error, attempts, point_key::text FROM pgstream_dead_letters
             WHERE slot = $1 ORDER BY id",
            &[&slot],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
        .collect()
}

async fn one_poison_row_among_1000(version: PgVersion) {
    let db = PgServer::shared(version).create_database().await;
    db.exec("CREATE TABLE items (id int PRIMARY KEY, body text)")
        .await;
    let out = TempDir::new().unwrap();
    let sink = out.path().join("items.jsonl");
    let slot = db.unique_name("dlq");
    let pipeline = dead_letter_pipeline(&db, &slot, &sink);
    pipeline.setup().await;
    db.exec(
        "INSERT INTO items SELECT g, CASE WHEN g = 500 THEN 'a poison pill' ELSE 'item ' || g END
         FROM generate_series(1, 1000) g",
    )
    .await;
    let commit_lsn = db.current_lsn_bytes().await;
    let log = pipeline.catch_up().await;

    // The other 999 reach the sink, the poison row does not.
    let ids = upserted_ids(&sink);
    assert_eq!(ids.len(), 999, "{log}");
    assert!(!ids.contains(&500));
    // It is in the dead-letter table with its error, its tries and its position.
    let letters = stored(&db, &slot).await;
    assert_eq!(letters.len(), 1, "{letters:?}\n{log}");
    let (lsn, error, attempts, key) = &letters[0];
    assert!(
        error.contains("cannot handle the body \"a poison pill\""),
        "{error}"
    );
    assert_eq!(*attempts, 2, "tried --max-attempts times on its own");
    assert_eq!(key, "[\"500\"]");
    assert!(
        log.contains("dead-lettering an event that fails on its own"),
        "{log}"
    );
    // The slot passed it.
    assert!(pipeline.confirmed_flush_lsn().await >= commit_lsn);
    let lsn_of_insert: String = lsn.clone();

    // A replay through the same, still broken handler keeps it and counts the try.
    let listed = pipeline.run_to_exit(Some("dead-letters"), &["list"]).await;
    assert!(
        listed.contains(&lsn_of_insert) && listed.contains("a poison pill"),
        "{listed}"
    );
    let mut again = HostProcess::spawn(pipeline.command(Some("dead-letters"), &["replay"]))
        .expect("start the host");
    let status = again
        .wait_timeout(Duration::from_secs(120))
        .await
        .expect("the replay ends");
    assert!(!status.success(), "{}", again.log());
    assert!(again.log().contains("1 failed again"), "{}", again.log());
    assert_eq!(stored(&db, &slot).await[0].2, 3);

    // After the fix (here: a handler that takes every row), the replay delivers it and
    // empties the table.
    let fixed =
        dead_letter_pipeline(&db, &slot, &sink).with_plugin_file(&plugin_path("echo-handler"));
    let replayed = fixed.run_to_exit(Some("dead-letters"), &["replay"]).await;
    assert!(replayed.contains("replayed 1 dead letters"), "{replayed}");
    assert!(stored(&db, &slot).await.is_empty());
    let echoed = jsonl(&sink)
        .into_iter()
        .filter(|line| line["op"] == "upsert" && line["payload"]["operation"] == "insert")
        .any(|line| line["payload"]["row"][1]["value"]["text"] == "a poison pill");
    assert!(echoed, "the replayed event reached the sink");

    // Purge empties what is left; nothing is left here, and that is said.
    let purged = fixed.run_to_exit(Some("dead-letters"), &["purge"]).await;
    assert!(purged.contains("purged 0 dead letters"), "{purged}");
}

/// An outage is not a reason to dead-letter: with the embedder answering 503 for a while,
/// the pipeline rides it out and, once it is back, every row arrives and the dead-letter table
/// stays empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedder_outage_is_ridden_out_and_dead_letters_nothing() {
    let server = OpenAiServer::start().await;
    let db = PgServer::shared(PgVersion::Pg18).create_database().await;
    db.exec("CREATE TABLE docs (id int PRIMARY KEY, content text)")
        .await;
    let out = TempDir::new().unwrap();
    let sink = out.path().join("docs.jsonl");
    let slot = db.unique_name("dlq");
    let pipeline = TestPipeline::new(&db, "docs", "embed-handler")
        .with_slot(&slot)
        .with_env("PGSTREAM_OPENAI_API_KEY", OpenAiServer::API_KEY)
        .without_env("OPENAI_API_KEY")
        .with_args(&[
            "--embedder".to_owned(),
            "openai".to_owned(),
            "--openai-base-url".to_owned(),
            server.base_url(),
            "--openai-model".to_owned(),
            OpenAiServer::MODEL.to_owned(),
            "--dimensions".to_owned(),
            OpenAiServer::DIMENSIONS.to_string(),
            "--sink".to_owned(),
            "jsonl".to_owned(),
            "--collection".to_owned(),
            sink.display().to_string(),
            "--backfill".to_owned(),
            "skip".to_owned(),
            "--max-attempts".to_owned(),
            "2".to_owned(),
            "--retry-backoff-ms".to_owned(),
            "10".to_owned(),
            "--on-failure".to_owned(),
            "dead-letter".to_owned(),
        ]);
    pipeline.setup().await;
    server.fail_next(12, 503, None);
    db.exec("INSERT INTO docs SELECT g, 'document ' || g FROM generate_series(1, 20) g")
        .await;
    let log = pipeline.catch_up().await;
    assert!(log.contains("unavailable"), "the outage was seen: {log}");
    assert!(!log.contains("dead-lettering"), "{log}");
    assert!(stored(&db, &slot).await.is_empty(), "{log}");
    assert_eq!(upserted_ids(&sink), (1..=20).collect());
}
