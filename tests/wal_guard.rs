//! The slot and WAL guard: a pipeline that stops confirming while the server writes WAL is
//! warned about before Postgres invalidates its slot (`max_slot_wal_keep_size`), and once the
//! slot is invalidated the pipeline stops with an error saying what happened and what to do;
//! the lost slot is never replaced behind the operator's back.

use std::time::Duration;

use pgstream_e2e::metrics_endpoint::{free_port, get, sample};
use pgstream_e2e::{PgServer, PgVersion, TestDb, TestPipeline, wait_until};
use tempfile::TempDir;

/// What the slot may hold back on the test's own server: two WAL segments.
const KEEP_SIZE: &str = "32MB";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg15_a_slot_near_its_wal_budget_is_warned_about_and_a_lost_one_stops_the_pipeline() {
    slot_guard(PgVersion::Pg15).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg18_a_slot_near_its_wal_budget_is_warned_about_and_a_lost_one_stops_the_pipeline() {
    slot_guard(PgVersion::Pg18).await;
}

/// Writes about `mib` MiB of WAL outside the watched tables, then ends the segment.
async fn write_wal(db: &TestDb, mib: u32) {
    let insert = format!(
        "INSERT INTO filler SELECT repeat(md5(g::text), 32) FROM generate_series(1, {}) g",
        mib * 1000
    );
    if let Err(error) = db.client().batch_execute(&insert).await {
        panic!("{insert}: {error:?}");
    }
    db.exec("SELECT pg_switch_wal()").await;
}

async fn wal_status(db: &TestDb, slot: &str) -> Option<String> {
    db.client()
        .query_opt(
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .and_then(|row| row.get(0))
}

async fn slot_guard(version: PgVersion) {
    // A server of its own: the keep size would put every other test's slots at risk.
    let server = PgServer::start(version).expect("start a server");
    let admin = server.superuser_client().await;
    admin
        .simple_query(&format!(
            "ALTER SYSTEM SET max_slot_wal_keep_size = '{KEEP_SIZE}'"
        ))
        .await
        .unwrap();
    admin.simple_query("SELECT pg_reload_conf()").await.unwrap();
    let db = server.create_database().await;
    db.exec("CREATE TABLE docs (id int PRIMARY KEY, content text); CREATE TABLE filler (x text);")
        .await;
    let out = TempDir::new().unwrap();
    let sink = out.path().join("sink.jsonl");
    let metrics_port = free_port();
    // The handler spins on its batch for as long as the test runs: the pipeline confirms
    // nothing from then on, like one stuck on a dependency.
    let pipeline = TestPipeline::new(&db, "docs", "loop-handler").with_args(&[
        "--embedder".to_owned(),
        "none".to_owned(),
        "--sink".to_owned(),
        "jsonl".to_owned(),
        "--collection".to_owned(),
        sink.display().to_string(),
        "--call-timeout-ms".to_owned(),
        "600000".to_owned(),
        "--metrics-addr".to_owned(),
        format!("127.0.0.1:{metrics_port}"),
    ]);
    let slot = db.unique_name("slot");
    let mut host = pipeline.start_streaming().await;
    db.exec("INSERT INTO docs VALUES (1, 'spin')").await;

    write_wal(&db, 20).await;
    host.wait_for_log("close to max_slot_wal_keep_size", Duration::from_secs(60))
        .await
        .unwrap_or_else(|error| panic!("the guard warns: {error}\n{}", host.log()));
    assert_ne!(wal_status(&db, &slot).await.as_deref(), Some("lost"));
    // The metrics show the lag the stuck pipeline builds up, and what the slot holds.
    wait_until(Duration::from_secs(30), || async {
        let Some((200, text)) = get(metrics_port, "/metrics").await else {
            return false;
        };
        sample(&text, "pgstream_replication_lag_bytes", &[])
            .is_some_and(|lag| lag >= 20.0 * 1024.0 * 1024.0)
            && sample(&text, "pgstream_slot_retained_wal_bytes", &[]).is_some()
            && sample(&text, "pgstream_slot_safe_wal_bytes", &[]).is_some()
    })
    .await
    .unwrap_or_else(|error| panic!("the lag shows in /metrics: {error}\n{}", host.log()));

    // More WAL and checkpoints until Postgres gives the slot up.
    wait_until(Duration::from_secs(120), || async {
        write_wal(&db, 20).await;
        db.exec("CHECKPOINT").await;
        wal_status(&db, &slot).await.as_deref() == Some("lost")
    })
    .await
    .unwrap_or_else(|error| panic!("the slot is invalidated: {error}\n{}", server.log()));
    host.wait_for_log("invalidated the replication slot", Duration::from_secs(60))
        .await
        .unwrap_or_else(|error| panic!("the guard reports the loss: {error}\n{}", host.log()));
    host.kill().await.unwrap();

    // A new start refuses the lost slot instead of streaming from a new one.
    let mut again = pipeline.start();
    let status = again
        .wait_timeout(Duration::from_secs(60))
        .await
        .expect("the host stops by itself");
    assert!(!status.success());
    let log = again.log();
    assert!(log.contains("was invalidated by Postgres"), "{log}");
    assert!(log.contains("pgstream-host teardown"), "{log}");
    assert_eq!(
        wal_status(&db, &slot).await.as_deref(),
        Some("lost"),
        "the lost slot is left for the operator, not replaced"
    );
}
