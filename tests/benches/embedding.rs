//! How close the whole pipeline comes to the embedder's own speed, per sink.
//!
//! With a real model, embedding dominates: the host's job is to keep the model busy and add
//! little around it (decoding, the guest call, the sink writes, the ACK). So the yardstick is
//! the embedder itself, measured in the same run on the same texts: the in-process
//! all-MiniLM-L6-v2 embedding every text the workload produces, in batches as large as the
//! host's, with as many threads as the host gets. Then the release host drains the same
//! workload with the `embed-handler` example into each sink, and the bench prints events/s,
//! texts embedded/s and the ratio of the latter to the raw rate (goal: at least 0.8x). The sinks
//! are pgvector (in the source database) and Qdrant, here the in-process fake Qdrant of the
//! tests (a real Qdrant server cannot be installed on the machines this runs on).
//!
//! Workload: the standard one (`pgstream_e2e::drain`) at 3,000 inserts, 1,000 updates and 300
//! deletes; every insert and update carries 100 characters of content to embed.
//! `PGSTREAM_BENCH_SCALE` divides the row counts. Run with `make bench`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use pgstream_e2e::drain::{
    StandardWorkload, bench_scale, create_slot, current_wal_lsn, drain_host,
};
use pgstream_e2e::{FakeQdrant, PgServer, PgVersion, TestDb, model_dir, plugin_path};
use pgstream_host::embed::{Embedder, MiniLmEmbedder, MiniLmOptions};

/// The publication every slot streams.
const PUBLICATION: &str = "bench_pub";
/// Events per handler call: the host's default `--batch-size`, so the raw embedder gets
/// batches as large as the handler asks for.
const BATCH_EVENTS: usize = 1000;
/// A drain that takes longer than this has hung.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1800);

/// A sink the pipeline is measured with.
#[derive(Debug, Clone, Copy)]
enum SinkUnderTest {
    /// The pgvector table `docs_embeddings` in the source database.
    Pgvector,
    /// The collection `docs_embeddings` of the in-process fake Qdrant (gRPC on loopback, real
    /// qdrant-client requests, Qdrant's validation rules, writes kept in memory).
    Qdrant,
}

impl SinkUnderTest {
    fn name(self) -> &'static str {
        match self {
            SinkUnderTest::Pgvector => "pgvector",
            SinkUnderTest::Qdrant => "qdrant",
        }
    }

    /// The host flags that select this sink.
    fn args(self, qdrant: &FakeQdrant) -> Vec<String> {
        match self {
            SinkUnderTest::Pgvector => vec!["--sink".into(), "pgvector".into()],
            SinkUnderTest::Qdrant => vec![
                "--sink".into(),
                "qdrant".into(),
                "--qdrant-url".into(),
                qdrant.url(),
            ],
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let scale = bench_scale()?;
    let workload = StandardWorkload {
        inserts: 3_000 / scale,
        updates: 1_000 / scale,
        deletes: 300 / scale,
    };
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let plugin = plugin_path("embed-handler");
    let scratch = tempfile::Builder::new()
        .prefix("pgstream-bench-embedding-")
        .tempdir()?;

    println!("starting PostgreSQL 18");
    let server = PgServer::start(PgVersion::Pg18)?;
    let db = server.create_database().await;
    db.create_vector_extension().await;
    db.client()
        .batch_execute(&format!(
            "CREATE TABLE docs (id bigint PRIMARY KEY, title text, content text);\n\
             CREATE PUBLICATION {PUBLICATION} FOR TABLE docs;"
        ))
        .await?;
    let sinks = [SinkUnderTest::Pgvector, SinkUnderTest::Qdrant];
    let qdrant = FakeQdrant::start().await?;
    for sink in sinks {
        create_slot(&db, sink.name()).await?;
    }
    println!(
        "writing {} inserts, {} updates, {} deletes",
        workload.inserts, workload.updates, workload.deletes
    );
    workload.write(&db).await?;
    let end = current_wal_lsn(&db).await?;

    let texts = workload_texts(&db, &workload).await?;
    ensure!(texts.len() as u64 == workload.texts());
    println!(
        "raw embedder: all-MiniLM-L6-v2, {threads} threads, {} texts in batches of {BATCH_EVENTS}",
        texts.len()
    );
    let raw_rate = raw_embedder_rate(&texts, threads).await?;
    println!("  {raw_rate:.1} texts/s");

    let mut results = Vec::new();
    for sink in sinks {
        let mut args: Vec<String> = [
            "--dsn",
            db.dsn(),
            "--table",
            "public.docs",
            "--slot",
            sink.name(),
            "--publication",
            PUBLICATION,
            "--plugin",
            &plugin.display().to_string(),
            "--embedder",
            "minilm",
            "--model-dir",
            &model_dir().display().to_string(),
            "--embed-threads",
            &threads.to_string(),
            "--cache-dir",
            &scratch.path().join("component-cache").display().to_string(),
            "--stop-at-lsn",
            &end,
            "--progress-secs",
            "3600",
        ]
        .iter()
        .map(|arg| arg.to_string())
        .collect();
        args.extend(sink.args(&qdrant));
        println!("pipeline into {}", sink.name());
        let drain = drain_host(&args, workload.events(), DRAIN_TIMEOUT).await?;
        check_points(&db, &qdrant, sink, &workload).await?;
        let texts_rate = drain.rate(workload.texts());
        // From the "streaming" line to the last confirm: without loading the model and the
        // component, which a long-running host pays once.
        let streaming = drain.streaming.unwrap_or(drain.wall);
        let streaming_rate = workload.texts() as f64 / streaming.as_secs_f64();
        println!(
            "  {:.1} s ({:.1} s streaming), {:.1} events/s, {texts_rate:.1} texts/s, peak RSS {} MiB",
            drain.wall.as_secs_f64(),
            streaming.as_secs_f64(),
            drain.rate(workload.events()),
            drain.peak_rss_kib.unwrap_or(0) / 1024
        );
        results.push((
            sink,
            drain.rate(workload.events()),
            texts_rate,
            streaming_rate,
        ));
    }

    println!();
    println!(
        "pipeline vs raw embedder ({} events, {} texts; \"whole run\" is process start to exit, \
         including loading the model and the component; \"streaming\" leaves those out):",
        workload.events(),
        workload.texts()
    );
    println!("  raw embedder          {raw_rate:>8.1} texts/s");
    for (sink, events_rate, texts_rate, streaming_rate) in results {
        println!(
            "  pipeline -> {:<9} {texts_rate:>8.1} texts/s ({events_rate:.1} events/s) whole run, \
             {streaming_rate:.1} texts/s streaming; ratio {:.2}x whole run, {:.2}x streaming \
             (goal >= 0.80x)",
            sink.name(),
            texts_rate / raw_rate,
            streaming_rate / raw_rate
        );
    }
    Ok(())
}

/// The contents the workload embeds, in the order the handler sees them: every inserted
/// row's, then every updated row's, computed by Postgres with the workload's own expressions.
async fn workload_texts(db: &TestDb, workload: &StandardWorkload) -> Result<Vec<String>> {
    let inserted = db
        .client()
        .query(
            &format!(
                "SELECT {} FROM generate_series(1::bigint, $1::bigint) AS g ORDER BY g",
                StandardWorkload::INSERTED_CONTENT
            ),
            &[&workload.inserts],
        )
        .await?;
    let updated = db
        .client()
        .query(
            "SELECT rpad(md5((g + 1)::text), 100, 'u') FROM generate_series(1::bigint, $1::bigint) \
             AS g ORDER BY g",
            &[&workload.updates],
        )
        .await?;
    Ok(inserted
        .iter()
        .chain(&updated)
        .map(|row| row.get::<_, String>(0))
        .collect())
}

/// Texts per second of the in-process embedder on `texts`, in host-sized batches, after one
/// warm-up batch (the host, too, has loaded the model before its first batch arrives).
async fn raw_embedder_rate(texts: &[String], threads: usize) -> Result<f64> {
    let embedder: Arc<dyn Embedder> = Arc::new(MiniLmEmbedder::load(
        &model_dir(),
        MiniLmOptions {
            threads,
            ..MiniLmOptions::default()
        },
    )?);
    embedder.embed(&texts[..texts.len().min(32)]).await?;
    let started = Instant::now();
    let mut vectors = 0;
    for batch in texts.chunks(BATCH_EVENTS) {
        vectors += embedder.embed(batch).await?.len();
    }
    let elapsed = started.elapsed();
    ensure!(
        vectors == texts.len(),
        "the embedder returned {vectors} vectors"
    );
    Ok(texts.len() as f64 / elapsed.as_secs_f64())
}

/// The sink holds one point per surviving row with content: the drain really wrote.
async fn check_points(
    db: &TestDb,
    qdrant: &FakeQdrant,
    sink: SinkUnderTest,
    workload: &StandardWorkload,
) -> Result<()> {
    let expected = workload.inserts - workload.deletes;
    let stored = match sink {
        SinkUnderTest::Pgvector => db
            .client()
            .query_one("SELECT count(*) FROM docs_embeddings", &[])
            .await?
            .get::<_, i64>(0),
        SinkUnderTest::Qdrant => i64::try_from(qdrant.points("docs_embeddings").len())?,
    };
    ensure!(
        stored == expected,
        "{} holds {stored} points, expected {expected}",
        sink.name()
    );
    Ok(())
}
