//! End-to-end throughput and memory of the pipeline, against `pg_recvlogical` as the yardstick.
//!
//! One throwaway PostgreSQL 18 gets one WAL stream: 100,000 inserts, 50,000 updates and 10,000
//! deletes of a `docs(id bigint, title text, content text)` table (~100 bytes of content per
//! row), in transactions of 100 rows. Replication slots created before the writes all see that
//! same stream; each is drained once, alternately by `pg_recvlogical` (which only copies the
//! pgoutput bytes to `/dev/null`) and by the release `pgstream-host` with the noop handler (which
//! decodes every message, builds events, and passes every batch into a wasm guest that ignores
//! it). Both stop at the same WAL position. Wall clock runs from process start to exit, so it
//! includes connecting and, for the host, loading the (cached) component.
//!
//! Memory: the host's peak RSS (`VmHWM`) on that workload and on one transaction of 1,000,000
//! inserted rows, which must not be much larger: batches cut a large transaction, so nothing
//! should grow with its size.
//!
//! Run with `make bench`; `PGSTREAM_BENCH_SCALE=10` divides every row count by 10 for a quick try,
//! and `PGSTREAM_HOST_BIN` names the host binary to measure.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use pgstream_e2e::drain::{
    Drain, ROWS_PER_TRANSACTION, StandardWorkload, bench_scale, create_slot, current_wal_lsn,
    drain_host, fastest, median_rate,
};
use pgstream_e2e::{PgServer, PgVersion, SUPERUSER, TestDb, plugin_path};

/// The publication every slot streams.
const PUBLICATION: &str = "bench_pub";
/// A drain that takes longer than this has hung.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(900);

/// Row counts of the workloads, divided by `PGSTREAM_BENCH_SCALE` when it is set, and how many
/// times each drain runs on the standard workload (`PGSTREAM_BENCH_RUNS`, default 3; the best
/// and the median run are reported).
struct Workload {
    runs: usize,
    standard: StandardWorkload,
    big_transaction: i64,
}

impl Workload {
    fn from_env() -> Result<Workload> {
        let scale = bench_scale()?;
        let runs: usize = match std::env::var("PGSTREAM_BENCH_RUNS") {
            Ok(text) => text
                .parse()
                .context("PGSTREAM_BENCH_RUNS is a whole number")?,
            Err(_) => 3,
        };
        ensure!(runs >= 1, "PGSTREAM_BENCH_RUNS must be at least 1");
        Ok(Workload {
            runs,
            standard: StandardWorkload {
                inserts: 100_000 / scale,
                updates: 50_000 / scale,
                deletes: 10_000 / scale,
            },
            big_transaction: 1_000_000 / scale,
        })
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let workload = Workload::from_env()?;
    let plugin = plugin_path("noop-handler");
    let scratch = tempfile::Builder::new()
        .prefix("pgstream-bench-")
        .tempdir()?;

    println!("starting PostgreSQL 18");
    let server = PgServer::start(PgVersion::Pg18)?;
    let db = server.create_database().await;
    db.client()
        .batch_execute(&format!(
            "CREATE TABLE docs (id bigint PRIMARY KEY, title text, content text);\n\
             CREATE PUBLICATION {PUBLICATION} FOR TABLE docs;"
        ))
        .await?;

    // Every slot of the standard workload exists before its first write, so all of them
    // decode the very same stream.
    let recvlogical_slots: Vec<String> = (1..=workload.runs)
        .map(|run| format!("recvlogical_{run}"))
        .collect();
    let host_slots: Vec<String> = (1..=workload.runs)
        .map(|run| format!("host_{run}"))
        .collect();
    let metrics_slots: Vec<String> = (1..=workload.runs)
        .map(|run| format!("host_metrics_{run}"))
        .collect();
    for slot in recvlogical_slots
        .iter()
        .chain(&host_slots)
        .chain(&metrics_slots)
    {
        create_slot(&db, slot).await?;
    }
    println!(
        "writing {} inserts, {} updates, {} deletes in transactions of {ROWS_PER_TRANSACTION} rows",
        workload.standard.inserts, workload.standard.updates, workload.standard.deletes
    );
    let start = current_wal_lsn(&db).await?;
    let started = Instant::now();
    workload.standard.write(&db).await?;
    let end = current_wal_lsn(&db).await?;
    println!(
        "  written in {:.1} s, end of WAL {end}",
        started.elapsed().as_secs_f64()
    );

    // The host's first start compiles the component into its cache. A run on a slot made after
    // the workload has nothing to stream, so it does just that: every measured run then loads
    // the compiled component from the cache, as a restarted host does.
    create_slot(&db, "host_warmup").await?;
    drain_noop(&db, &plugin, scratch.path(), "host_warmup", &end, 0, false).await?;

    let events = workload.standard.events();
    let mut recvlogical_runs = Vec::new();
    let mut host_runs = Vec::new();
    let mut metrics_runs = Vec::new();
    // Alternating the two keeps a warmer page cache or a busier moment from favouring one.
    for run in 0..workload.runs {
        let drain = drain_recvlogical(&server, &db, &recvlogical_slots[run], &end)?;
        println!(
            "  pg_recvlogical run {}: {:.2} s, {:.0} events/s",
            run + 1,
            drain.wall.as_secs_f64(),
            drain.rate(events)
        );
        recvlogical_runs.push(drain);
        let drain = drain_noop(
            &db,
            &plugin,
            scratch.path(),
            &host_slots[run],
            &end,
            events,
            false,
        )
        .await?;
        println!(
            "  pgstream-host  run {}: {:.2} s, {:.0} events/s (streaming {:.2} s, CPU {:.2} s), peak RSS {} MiB",
            run + 1,
            drain.wall.as_secs_f64(),
            drain.rate(events),
            drain.streaming.unwrap_or_default().as_secs_f64(),
            drain.cpu.unwrap_or_default().as_secs_f64(),
            drain.peak_rss_kib.unwrap_or(0) / 1024,
        );
        host_runs.push(drain);
        let drain = drain_noop(
            &db,
            &plugin,
            scratch.path(),
            &metrics_slots[run],
            &end,
            events,
            true,
        )
        .await?;
        println!(
            "  with metrics   run {}: {:.2} s, {:.0} events/s",
            run + 1,
            drain.wall.as_secs_f64(),
            drain.rate(events)
        );
        metrics_runs.push(drain);
    }
    check_confirmed(&db, &recvlogical_slots, &host_slots, &start).await?;

    // The large transaction gets slots of its own, created after the standard workload, so its
    // drains do not decode the standard workload again.
    create_slot(&db, "recvlogical_big").await?;
    create_slot(&db, "host_big").await?;
    println!(
        "writing one transaction of {} inserted rows",
        workload.big_transaction
    );
    let started = Instant::now();
    write_big_transaction(&db, &workload).await?;
    let big_end = current_wal_lsn(&db).await?;
    println!(
        "  written in {:.1} s, end of WAL {big_end}",
        started.elapsed().as_secs_f64()
    );
    let big_events = u64::try_from(workload.big_transaction)?;
    let big_recvlogical = drain_recvlogical(&server, &db, "recvlogical_big", &big_end)?;
    let big_host = drain_noop(
        &db,
        &plugin,
        scratch.path(),
        "host_big",
        &big_end,
        big_events,
        false,
    )
    .await?;

    let best_recvlogical = fastest(&recvlogical_runs)?;
    let best_host = fastest(&host_runs)?;
    let standard_peak = host_runs
        .iter()
        .filter_map(|drain| drain.peak_rss_kib)
        .max()
        .unwrap_or(0);
    let big_peak = big_host.peak_rss_kib.unwrap_or(0);
    println!();
    println!(
        "pipeline throughput ({events} events; best of {} runs each, median in brackets; wall \
         clock from process start to exit):",
        workload.runs
    );
    println!(
        "  pg_recvlogical  {:>9.0} events/s  ({:.0})  {:.2} s",
        best_recvlogical.rate(events),
        median_rate(&recvlogical_runs, events),
        best_recvlogical.wall.as_secs_f64()
    );
    println!(
        "  pgstream-host   {:>9.0} events/s  ({:.0})  {:.2} s, of which {:.2} s from \"streaming\" \
         to \"reached --stop-at-lsn\"; host CPU {:.2} s",
        best_host.rate(events),
        median_rate(&host_runs, events),
        best_host.wall.as_secs_f64(),
        best_host.streaming.unwrap_or_default().as_secs_f64(),
        best_host.cpu.unwrap_or_default().as_secs_f64()
    );
    println!(
        "  ratio host / pg_recvlogical: {:.2}x best, {:.2}x median (goal >= 0.90x)",
        best_host.rate(events) / best_recvlogical.rate(events),
        median_rate(&host_runs, events) / median_rate(&recvlogical_runs, events)
    );
    println!(
        "  with --metrics-addr {:>9.0} events/s  ({:.0}): {:.3}x the host without (goal >= 0.97x)",
        fastest(&metrics_runs)?.rate(events),
        median_rate(&metrics_runs, events),
        fastest(&metrics_runs)?.rate(events) / best_host.rate(events)
    );
    println!("one transaction of {big_events} inserts (one run each):");
    println!(
        "  pg_recvlogical  {:>9.0} events/s  ({:.2} s)",
        big_recvlogical.rate(big_events),
        big_recvlogical.wall.as_secs_f64()
    );
    println!(
        "  pgstream-host   {:>9.0} events/s  ({:.2} s)",
        big_host.rate(big_events),
        big_host.wall.as_secs_f64()
    );
    println!("host peak RSS (VmHWM, goal < 100 MiB and flat in transaction size):");
    println!(
        "  {events} events in transactions of {ROWS_PER_TRANSACTION}: {:.1} MiB",
        standard_peak as f64 / 1024.0
    );
    println!(
        "  one transaction of {big_events} rows: {:.1} MiB",
        big_peak as f64 / 1024.0
    );
    Ok(())
}

async fn write_big_transaction(db: &TestDb, workload: &Workload) -> Result<()> {
    // Above every id of the standard workload.
    let first = 10_000_000i64;
    let last = first + workload.big_transaction - 1;
    let rows = db
        .client()
        .execute(
            "INSERT INTO docs (id, title, content) \
             SELECT g, 'title ' || g, rpad(md5(g::text), 100, md5((g * 7)::text)) \
             FROM generate_series($1::bigint, $2::bigint) AS g",
            &[&first, &last],
        )
        .await?;
    ensure!(rows == u64::try_from(workload.big_transaction)?);
    Ok(())
}

/// `pg_recvlogical` from the server's own installation, writing the pgoutput stream to
/// `/dev/null` until `end`.
fn drain_recvlogical(server: &PgServer, db: &TestDb, slot: &str, end: &str) -> Result<Drain> {
    let program = server.bin_dir().join("pg_recvlogical");
    let mut command = Command::new(&program);
    command
        .args(["--host", "127.0.0.1", "--port", &db.port().to_string()])
        .args([
            "--username",
            SUPERUSER,
            "--dbname",
            db.name(),
            "--no-password",
        ])
        .args([
            "--slot",
            slot,
            "--start",
            "--no-loop",
            "--file",
            "/dev/null",
        ])
        .args(["--option", "proto_version=1"])
        .arg("--option")
        .arg(format!("publication_names={PUBLICATION}"))
        .arg(format!("--endpos={end}"))
        .env_remove("PGPASSWORD")
        .env_remove("PGSERVICE");
    let started = Instant::now();
    let output = command
        .output()
        .with_context(|| format!("running {}", program.display()))?;
    let wall = started.elapsed();
    if !output.status.success() {
        bail!(
            "pg_recvlogical failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(Drain::timed(wall))
}

/// The host with the noop handler, no embedder and the JSON-lines sink (which gets no writes)
/// on `slot` until it confirmed `end`; checks it handed `expected_events` events to the
/// handler.
async fn drain_noop(
    db: &TestDb,
    plugin: &Path,
    scratch: &Path,
    slot: &str,
    end: &str,
    expected_events: u64,
    with_metrics: bool,
) -> Result<Drain> {
    let mut args: Vec<String> = [
        "--dsn",
        db.dsn(),
        "--table",
        "public.docs",
        "--slot",
        slot,
        "--publication",
        PUBLICATION,
        "--plugin",
        &plugin.display().to_string(),
        "--embedder",
        "none",
        "--sink",
        "jsonl",
        "--collection",
        &scratch.join(format!("{slot}.jsonl")).display().to_string(),
        "--cache-dir",
        &scratch.join("component-cache").display().to_string(),
        "--stop-at-lsn",
        end,
        "--progress-secs",
        "3600",
    ]
    .iter()
    .map(|arg| arg.to_string())
    .collect();
    if with_metrics {
        // Port 0: any free one; nothing scrapes, so this measures the counting alone.
        args.extend(["--metrics-addr".to_owned(), "127.0.0.1:0".to_owned()]);
    }
    drain_host(&args, expected_events, DRAIN_TIMEOUT).await
}

/// Every drained slot confirmed a position past `start`, where the workload began: the drains
/// really consumed it.
async fn check_confirmed(
    db: &TestDb,
    recvlogical: &[String],
    host: &[String],
    start: &str,
) -> Result<()> {
    for slot in recvlogical.iter().chain(host) {
        let row = db
            .client()
            .query_one(
                "SELECT confirmed_flush_lsn > $2::text::pg_lsn FROM pg_replication_slots \
                 WHERE slot_name = $1",
                &[slot, &start],
            )
            .await?;
        ensure!(
            row.get::<_, Option<bool>>(0) == Some(true),
            "slot {slot} did not confirm anything past {start}"
        );
    }
    Ok(())
}
