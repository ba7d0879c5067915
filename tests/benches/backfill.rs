//! How fast a backfill delivers the rows a table already holds, against the fastest way to
//! read them out of Postgres, and against the embedder when the handler embeds.
//!
//! (a) 100,000 existing rows, the no-op handler: rows/s of the backfill (from its "backfill
//!     started" to its "backfill done" line) against a plain `COPY (SELECT ...) TO STDOUT` of
//!     the same table, drained by a client in the same run. Also on 20,000 rows, to show the
//!     host's peak RSS does not grow with the table (chunks are bounded, nothing is kept).
//! (b) 2,000 existing rows of 10 to 60 words, the `embed-handler` example with the in-process
//!     all-MiniLM-L6-v2 into pgvector: texts/s against the raw embedder on the same texts, in
//!     batches as large as the host's (goal: at least 0.8x).
//!
//! `PGSTREAM_BENCH_SCALE` divides the row counts. Run with `make bench`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use futures::StreamExt;
use pgstream_e2e::drain::{bench_scale, field_of_line, vm_hwm_kib};
use pgstream_e2e::{HostProcess, PgServer, PgVersion, TestDb, model_dir, plugin_path};
use pgstream_host::embed::{Embedder, MiniLmEmbedder, MiniLmOptions};

/// Events per handler call: the host's default `--batch-size`.
const BATCH_EVENTS: usize = 1000;
/// A backfill that takes longer than this has hung.
const BACKFILL_TIMEOUT: Duration = Duration::from_secs(1800);

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let scale = bench_scale()?;
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let scratch = tempfile::Builder::new()
        .prefix("pgstream-bench-backfill-")
        .tempdir()?;
    let cache_dir = scratch.path().join("component-cache");

    println!("starting PostgreSQL 18");
    let server = PgServer::start(PgVersion::Pg18)?;

    // (a) no-op handler against COPY, and peak RSS on two table sizes.
    let mut noop = Vec::new();
    for rows in [20_000 / scale, 100_000 / scale] {
        let db = server.create_database().await;
        fill(&db, rows).await?;
        let copy_rate = copy_rate(&db, rows).await?;
        let run = backfill(&db, "noop-handler", &["--embedder", "none"], &cache_dir).await?;
        println!(
            "{rows} rows: COPY {copy_rate:.0} rows/s; backfill {:.0} rows/s ({:.2}x COPY), \
             {:.1} s, peak RSS {} MiB",
            run.rows_per_sec,
            run.rows_per_sec / copy_rate,
            run.secs,
            run.peak_rss_kib / 1024
        );
        noop.push((rows, copy_rate, run));
    }

    // (b) MiniLM into pgvector against the raw embedder.
    let rows = 2_000 / scale;
    let db = server.create_database().await;
    db.create_vector_extension().await;
    fill(&db, rows).await?;
    let texts: Vec<String> = db
        .client()
        .query("SELECT content FROM docs ORDER BY id", &[])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    println!(
        "raw embedder: all-MiniLM-L6-v2, {threads} threads, {} texts in batches of {BATCH_EVENTS}",
        texts.len()
    );
    let raw_rate = raw_embedder_rate(&texts, threads).await?;
    println!("  {raw_rate:.1} texts/s");
    let model = model_dir().display().to_string();
    let threads_arg = threads.to_string();
    let embedded = backfill(
        &db,
        "embed-handler",
        &[
            "--embedder",
            "minilm",
            "--model-dir",
            &model,
            "--embed-threads",
            &threads_arg,
            "--sink",
            "pgvector",
        ],
        &cache_dir,
    )
    .await?;
    let stored: i64 = db
        .client()
        .query_one("SELECT count(*) FROM docs_embeddings", &[])
        .await?
        .get(0);
    ensure!(stored == rows, "{stored} points stored, expected {rows}");

    println!();
    println!("backfill of existing rows (same run):");
    for (rows, copy_rate, run) in &noop {
        println!(
            "  no-op handler, {rows:>7} rows: {:>9.0} rows/s vs COPY {copy_rate:>9.0} rows/s: \
             {:.2}x; peak RSS {} MiB",
            run.rows_per_sec,
            run.rows_per_sec / copy_rate,
            run.peak_rss_kib / 1024
        );
    }
    if let [(small, _, small_run), (large, _, large_run)] = noop.as_slice() {
        println!(
            "  peak RSS {large} rows / {small} rows: {:.2}x (flat is 1.00x)",
            large_run.peak_rss_kib as f64 / small_run.peak_rss_kib.max(1) as f64
        );
    }
    println!(
        "  MiniLM -> pgvector, {rows} rows: {:.1} texts/s vs raw embedder {raw_rate:.1} texts/s: \
         {:.2}x (goal >= 0.80x)",
        embedded.rows_per_sec,
        embedded.rows_per_sec / raw_rate
    );
    Ok(())
}

/// `docs (id, title, content)` with `rows` rows whose content has 10 to 60 words.
async fn fill(db: &TestDb, rows: i64) -> Result<()> {
    db.client()
        .batch_execute(&format!(
            "CREATE TABLE docs (id bigint PRIMARY KEY, title text, content text);
             INSERT INTO docs SELECT g, 'title ' || g,
               'document ' || g || ' about topic ' || (g % 97) || ' ' ||
               repeat('and more words on subject ' || (g % 13) || ' ', (g % 10) + 1)
             FROM generate_series(1, {rows}) g;
             ANALYZE docs;"
        ))
        .await?;
    Ok(())
}

/// Rows/s of `COPY (SELECT id, title, content FROM docs) TO STDOUT`, drained by a client.
async fn copy_rate(db: &TestDb, rows: i64) -> Result<f64> {
    let started = Instant::now();
    let stream = db
        .client()
        .copy_out("COPY (SELECT id, title, content FROM docs ORDER BY id) TO STDOUT")
        .await?;
    futures::pin_mut!(stream);
    let mut lines = 0;
    while let Some(chunk) = stream.next().await {
        lines += chunk?.iter().filter(|&&byte| byte == b'\n').count() as i64;
    }
    ensure!(lines == rows, "COPY gave {lines} rows, expected {rows}");
    Ok(rows as f64 / started.elapsed().as_secs_f64())
}

/// One measured backfill.
struct BackfillRun {
    rows_per_sec: f64,
    secs: f64,
    peak_rss_kib: u64,
}

/// Starts the release host on `db.docs` with a new slot (so the rows are backfilled), waits
/// for the backfill to be done, and reads its rate from the host's "backfill done" line.
async fn backfill(
    db: &TestDb,
    plugin: &str,
    extra: &[&str],
    cache_dir: &std::path::Path,
) -> Result<BackfillRun> {
    let plugin = plugin_path(plugin);
    let mut command = HostProcess::command();
    command
        .args([
            "--dsn",
            db.dsn(),
            "--table",
            "public.docs",
            "--slot",
            "bench",
        ])
        .arg("--plugin")
        .arg(&plugin)
        .arg("--cache-dir")
        .arg(cache_dir)
        .args(["--progress-secs", "3600"])
        .args(extra)
        .env("NO_COLOR", "1");
    let started = Instant::now();
    let mut host = HostProcess::spawn(command)?;
    let status_file = PathBuf::from(format!("/proc/{}/status", host.pid()));
    let mut peak_rss_kib = 0;
    loop {
        if let Some(kib) = std::fs::read_to_string(&status_file)
            .ok()
            .as_deref()
            .and_then(vm_hwm_kib)
        {
            peak_rss_kib = peak_rss_kib.max(kib);
        }
        if host.log().contains("backfill done") {
            break;
        }
        ensure!(
            host.try_status()?.is_none(),
            "the host exited before the backfill was done:\n{}",
            host.log()
        );
        ensure!(
            started.elapsed() < BACKFILL_TIMEOUT,
            "the backfill did not finish within {BACKFILL_TIMEOUT:?}:\n{}",
            host.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = host.log();
    host.terminate(Duration::from_secs(30)).await?;
    let secs: f64 = field_of_line(&log, "backfill done", "secs=")
        .and_then(|text| text.parse().ok())
        .with_context(|| format!("no secs= in the backfill done line:\n{log}"))?;
    let rows: f64 = field_of_line(&log, "backfill done", "rows_done=")
        .and_then(|text| text.parse().ok())
        .with_context(|| format!("no rows_done= in the backfill done line:\n{log}"))?;
    Ok(BackfillRun {
        rows_per_sec: rows / secs.max(1e-3),
        secs,
        peak_rss_kib,
    })
}

/// Texts/s of the in-process embedder on `texts`, in batches of [`BATCH_EVENTS`].
async fn raw_embedder_rate(texts: &[String], threads: usize) -> Result<f64> {
    let embedder = MiniLmEmbedder::load(
        &model_dir(),
        MiniLmOptions {
            threads,
            ..MiniLmOptions::default()
        },
    )?;
    // One warm-up batch, as the host's first batch also pays for first-touch allocations.
    embedder.embed(&texts[..texts.len().min(64)]).await?;
    let started = Instant::now();
    for batch in texts.chunks(BATCH_EVENTS) {
        embedder.embed(batch).await?;
    }
    Ok(texts.len() as f64 / started.elapsed().as_secs_f64())
}
