//! Faults the hardening review found handled too slowly or too late: a sink database that goes
//! away is waited for with progress lines and the pipeline resumes within seconds of its return
//! (nothing confirmed meanwhile), a plugin that cannot even start under its memory limit
//! stops the host at once, before a slot is made for it, and five SIGKILLs, each after the
//! host confirmed progress, lose nothing.

use std::time::{Duration, Instant};

use pgstream_e2e::tenants::upserted_ids;
use pgstream_e2e::{HOST_RUN_TIMEOUT, PgServer, PgVersion, TestPipeline, wait_until};
use tokio_postgres::NoTls;

/// Rows in the sink's `docs_embeddings` table, or `None` while the sink is unreachable.
async fn sink_rows(dsn: &str) -> Option<i64> {
    let (client, connection) = tokio_postgres::connect(dsn, NoTls).await.ok()?;
    tokio::spawn(connection);
    client
        .query_one("SELECT count(*) FROM public.docs_embeddings", &[])
        .await
        .ok()
        .map(|row| row.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_outage_is_waited_out_and_the_pipeline_resumes_within_seconds() {
    let db = PgServer::shared(PgVersion::Pg18).create_database().await;
    db.exec("CREATE TABLE docs (id int PRIMARY KEY, content text);")
        .await;
    // The sink database on a server of its own: this test stops it.
    let sink_server = PgServer::start(PgVersion::Pg18).expect("start the sink server");
    let sink_dsn = sink_server.superuser_dsn();
    let pipeline = TestPipeline::new(&db, "docs", "embed-handler").with_args(&[
        "--sink-dsn",
        &sink_dsn,
        "--collection",
        "public.docs_embeddings",
    ]);
    pipeline.setup().await;
    let mut host = pipeline.start_streaming().await;
    db.exec("INSERT INTO docs SELECT g, 'document ' || g FROM generate_series(1, 10) g")
        .await;
    wait_until(Duration::from_secs(120), || async {
        sink_rows(&sink_dsn).await == Some(10)
    })
    .await
    .unwrap_or_else(|error| panic!("the first rows arrive: {error}\n{}", host.log()));

    sink_server.stop().expect("stop the sink server");
    db.exec("INSERT INTO docs SELECT g, 'document ' || g FROM generate_series(11, 20) g")
        .await;
    // At or past the end of that transaction; the slot must stay before it.
    let after_insert = db.current_lsn_bytes().await;
    // Long enough for backoff without a cap to have grown past 10 s (0.5, 1, 2, 4, 8, 16 ...).
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert!(
        pipeline.confirmed_flush_lsn().await < after_insert,
        "nothing written during the outage is confirmed"
    );
    let log = host.log();
    assert!(
        log.contains("progress: waiting; the embedder or the sink is unavailable"),
        "progress lines say what is awaited:\n{log}"
    );

    sink_server
        .start_again()
        .expect("start the sink server again");
    let back = Instant::now();
    wait_until(Duration::from_secs(60), || async {
        sink_rows(&sink_dsn).await == Some(20)
    })
    .await
    .unwrap_or_else(|error| panic!("the rows of the outage arrive: {error}\n{}", host.log()));
    let recovery = back.elapsed();
    println!("recovered {recovery:?} after the sink came back");
    // Retries are at most 3 s apart during an outage; the bound leaves room for a slow machine.
    assert!(
        recovery < Duration::from_secs(15),
        "recovery took {recovery:?}:\n{}",
        host.log()
    );
    let status = host.terminate(HOST_RUN_TIMEOUT).await.unwrap();
    assert!(status.success(), "{}", host.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_cannot_start_under_its_memory_limit_fails_before_a_slot_is_made() {
    let db = PgServer::shared(PgVersion::Pg15).create_database().await;
    db.exec("CREATE TABLE docs (id int PRIMARY KEY, content text);")
        .await;
    let pipeline = TestPipeline::new(&db, "docs", "trap-handler").with_args(&[
        "--embedder",
        "none",
        "--memory-limit-mb",
        "1",
    ]);
    let mut host = pipeline.start();
    let status = host
        .wait_timeout(Duration::from_secs(60))
        .await
        .expect("the host stops by itself, without waiting for a change");
    assert!(!status.success());
    let log = host.log();
    assert!(log.contains("cannot instantiate plugin"), "{log}");
    assert!(log.contains("memory"), "{log}");
    let slots: i64 = db
        .client()
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE database = current_database()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        slots, 0,
        "no slot is left holding WAL for a pipeline that never ran"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_sigkills_with_progress_between_them_lose_nothing() {
    let db = PgServer::shared(PgVersion::Pg15).create_database().await;
    db.exec("CREATE TABLE docs (id int PRIMARY KEY, content text);")
        .await;
    let out = tempfile::TempDir::new().unwrap();
    let sink = out.path().join("docs.jsonl");
    let pipeline = TestPipeline::new(&db, "docs", "trap-handler").with_args(&[
        "--embedder".to_owned(),
        "none".to_owned(),
        "--sink".to_owned(),
        "jsonl".to_owned(),
        "--collection".to_owned(),
        sink.display().to_string(),
        "--batch-size".to_owned(),
        "50".to_owned(),
    ]);
    pipeline.setup().await;
    let mut confirmed = pipeline.confirmed_flush_lsn().await;
    for kill in 0..5 {
        let mut host = pipeline.start();
        // Rows written while the host runs, in transactions of 100.
        for start in (kill * 1200 + 1..=(kill + 1) * 1200).step_by(100) {
            db.exec(&format!(
                "INSERT INTO docs SELECT g, 'row ' || g FROM generate_series({start}, {}) g",
                start + 99
            ))
            .await;
        }
        // Killed only once it confirmed more than before: each run makes progress.
        wait_until(Duration::from_secs(120), || async {
            pipeline.confirmed_flush_lsn().await > confirmed
        })
        .await
        .unwrap_or_else(|error| panic!("run {kill} makes progress: {error}\n{}", host.log()));
        host.kill().await.unwrap();
        confirmed = pipeline.confirmed_flush_lsn().await;
    }
    let end = db.current_lsn().await;
    let log = pipeline.run_to_exit(None, &["--stop-at-lsn", &end]).await;
    assert_eq!(
        upserted_ids(&sink),
        (1..=6000).collect(),
        "every row reached the sink after five SIGKILLs:\n{log}"
    );
}
