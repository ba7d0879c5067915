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

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use pgstream_e2e::{HostProcess, PgServer, PgVersion, SUPERUSER, TestDb, plugin_path};

/// Rows per transaction of the standard workload.
const ROWS_PER_TRANSACTION: i64 = 100;
/// The publication every slot streams.
const PUBLICATION: &str = "bench_pub";
/// How often the host's peak RSS is read while it runs.
const RSS_POLL: Duration = Duration::from_millis(10);
/// Names the environment variable that, when set, names the host binary to measure instead of
/// the one next to this bench (`make bench` points it at the release build it just made).
const HOST_BIN_VAR: &str = "PGSTREAM_HOST_BIN";
/// A drain that takes longer than this has hung.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(900);

/// Row counts of the workloads, divided by `PGSTREAM_BENCH_SCALE` when it is set, and how many
/// times each drain runs on the standard workload (`PGSTREAM_BENCH_RUNS`, default 3; the best
/// and the median run are reported).
struct Workload {
    runs: usize,
    inserts: i64,
    updates: i64,
    deletes: i64,
    big_transaction: i64,
}

impl Workload {
    fn from_env() -> Result<Workload> {
        let scale: i64 = match std::env::var("PGSTREAM_BENCH_SCALE") {
            Ok(text) => text
                .parse()
                .context("PGSTREAM_BENCH_SCALE is a whole number")?,
            Err(_) => 1,
        };
        ensure!(scale >= 1, "PGSTREAM_BENCH_SCALE must be at least 1");
        let runs: usize = match std::env::var("PGSTREAM_BENCH_RUNS") {
            Ok(text) => text
                .parse()
                .context("PGSTREAM_BENCH_RUNS is a whole number")?,
            Err(_) => 3,
        };
        ensure!(runs >= 1, "PGSTREAM_BENCH_RUNS must be at least 1");
        Ok(Workload {
            runs,
            inserts: 100_000 / scale,
            updates: 50_000 / scale,
            deletes: 10_000 / scale,
            big_transaction: 1_000_000 / scale,
        })
    }

    fn events(&self) -> u64 {
        u64::try_from(self.inserts + self.updates + self.deletes).unwrap_or(0)
    }
}

/// How one drain went.
struct Drain {
    /// Process start to exit.
    wall: Duration,
    /// Host only: from its "streaming" log line to its "reached --stop-at-lsn" line.
    streaming: Option<Duration>,
    /// Host only: the highest `VmHWM` read while it ran, in KiB.
    peak_rss_kib: Option<u64>,
    /// Host only: user + system CPU time at the last read before it exited.
    cpu: Option<Duration>,
}

impl Drain {
    fn rate(&self, events: u64) -> f64 {
        events as f64 / self.wall.as_secs_f64()
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
    for slot in recvlogical_slots.iter().chain(&host_slots) {
        create_slot(&db, slot).await?;
    }
    println!(
        "writing {} inserts, {} updates, {} deletes in transactions of {ROWS_PER_TRANSACTION} rows",
        workload.inserts, workload.updates, workload.deletes
    );
    let start = current_wal_lsn(&db).await?;
    let started = Instant::now();
    write_standard_workload(&db, &workload).await?;
    let end = current_wal_lsn(&db).await?;
    println!(
        "  written in {:.1} s, end of WAL {end}",
        started.elapsed().as_secs_f64()
    );

    // The host's first start compiles the component into its cache. A run on a slot made after
    // the workload has nothing to stream, so it does just that: every measured run then loads
    // the compiled component from the cache, as a restarted host does.
    create_slot(&db, "host_warmup").await?;
    drain_host(&db, &plugin, scratch.path(), "host_warmup", &end, 0).await?;

    let events = workload.events();
    let mut recvlogical_runs = Vec::new();
    let mut host_runs = Vec::new();
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
        let drain =
            drain_host(&db, &plugin, scratch.path(), &host_slots[run], &end, events).await?;
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
    let big_host = drain_host(
        &db,
        &plugin,
        scratch.path(),
        "host_big",
        &big_end,
        big_events,
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

async fn create_slot(db: &TestDb, slot: &str) -> Result<()> {
    db.client()
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await
        .with_context(|| format!("creating slot {slot}"))?;
    Ok(())
}

async fn current_wal_lsn(db: &TestDb) -> Result<String> {
    Ok(db
        .client()
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0))
}

/// Inserts, then updates and deletes some of the inserted rows, `ROWS_PER_TRANSACTION` rows per
/// statement, each statement its own transaction.
async fn write_standard_workload(db: &TestDb, workload: &Workload) -> Result<()> {
    let client = db.client();
    // rpad makes every content exactly 100 characters; md5 keeps rows distinct.
    let insert = client
        .prepare(
            "INSERT INTO docs (id, title, content) \
             SELECT g, 'title ' || g, rpad(md5(g::text), 100, md5((g * 7)::text)) \
             FROM generate_series($1::bigint, $2::bigint) AS g",
        )
        .await?;
    let update = client
        .prepare(
            "UPDATE docs SET content = rpad(md5((id + 1)::text), 100, 'u') \
             WHERE id BETWEEN $1::bigint AND $2::bigint",
        )
        .await?;
    let delete = client
        .prepare("DELETE FROM docs WHERE id BETWEEN $1::bigint AND $2::bigint")
        .await?;
    let mut written = 0u64;
    for (statement, first_id, rows) in [
        (&insert, 1, workload.inserts),
        (&update, 1, workload.updates),
        // Deletes take rows the updates did not touch.
        (&delete, workload.updates + 1, workload.deletes),
    ] {
        let mut from = first_id;
        let last = first_id + rows - 1;
        while from <= last {
            let to = (from + ROWS_PER_TRANSACTION - 1).min(last);
            written += client.execute(statement, &[&from, &to]).await?;
            from = to + 1;
        }
    }
    ensure!(
        written == workload.events(),
        "the workload touched {written} rows, expected {}",
        workload.events()
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
    Ok(Drain {
        wall,
        streaming: None,
        peak_rss_kib: None,
        cpu: None,
    })
}

/// The release host with the noop handler, run until it confirmed `end`; checks it handed
/// `expected_events` events to the handler.
async fn drain_host(
    db: &TestDb,
    plugin: &Path,
    scratch: &Path,
    slot: &str,
    end: &str,
    expected_events: u64,
) -> Result<Drain> {
    let mut command = match std::env::var_os(HOST_BIN_VAR) {
        Some(binary) => tokio::process::Command::new(binary),
        None => HostProcess::command(),
    };
    command
        .arg("--dsn")
        .arg(db.dsn())
        .args([
            "--table",
            "public.docs",
            "--slot",
            slot,
            "--publication",
            PUBLICATION,
        ])
        .arg("--plugin")
        .arg(plugin)
        .args(["--embedder", "none", "--sink", "jsonl"])
        .arg("--collection")
        .arg(scratch.join(format!("{slot}.jsonl")))
        .arg("--cache-dir")
        .arg(scratch.join("component-cache"))
        .args(["--stop-at-lsn", end, "--progress-secs", "3600"])
        .env("NO_COLOR", "1");
    let started = Instant::now();
    let mut host = HostProcess::spawn(command)?;
    let proc_status = PathBuf::from(format!("/proc/{}/status", host.pid()));
    let proc_stat = PathBuf::from(format!("/proc/{}/stat", host.pid()));
    let mut peak_rss_kib = 0;
    let mut cpu = Duration::ZERO;
    let status = loop {
        // VmHWM is the kernel's own high-water mark, so polling misses at most what happens
        // after the last read; once the process exited, its memory figures are gone.
        if let Some(kib) = std::fs::read_to_string(&proc_status)
            .ok()
            .as_deref()
            .and_then(vm_hwm_kib)
        {
            peak_rss_kib = peak_rss_kib.max(kib);
        }
        if let Some(time) = std::fs::read_to_string(&proc_stat)
            .ok()
            .as_deref()
            .and_then(cpu_time)
        {
            cpu = cpu.max(time);
        }
        if let Some(status) = host.try_status()? {
            break status;
        }
        ensure!(
            started.elapsed() < DRAIN_TIMEOUT,
            "the host did not reach {end} within {DRAIN_TIMEOUT:?}; its log:\n{}",
            host.log()
        );
        tokio::time::sleep(RSS_POLL).await;
    };
    let wall = started.elapsed();
    let log = host.log();
    ensure!(
        status.success(),
        "the host failed ({status}); its log:\n{log}"
    );
    let handled = field_of_line(&log, "stopped", "events=")
        .and_then(|text| text.parse::<u64>().ok())
        .with_context(|| format!("no events= in the host's stopped line; its log:\n{log}"))?;
    ensure!(
        handled == expected_events,
        "the host handled {handled} events, expected {expected_events}; its log:\n{log}"
    );
    let streaming = match (
        line_time(&log, " streaming"),
        line_time(&log, "reached --stop-at-lsn"),
    ) {
        (Some(from), Some(to)) => Some(Duration::from_secs_f64((to - from).max(0.0))),
        _ => None,
    };
    Ok(Drain {
        wall,
        streaming,
        peak_rss_kib: Some(peak_rss_kib),
        cpu: Some(cpu),
    })
}

/// `VmHWM:  12345 kB` from `/proc/<pid>/status`.
fn vm_hwm_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// User plus system time from `/proc/<pid>/stat` (fields 14 and 15, in clock ticks of 1/100 s,
/// the value Linux reports to user space on every common configuration).
fn cpu_time(stat: &str) -> Option<Duration> {
    // The command name (field 2) may hold spaces; the fields after its closing parenthesis do not.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_millis((user + system) * 10))
}

/// The value after `key` (up to the next space) on the first log line containing `marker`.
fn field_of_line<'a>(log: &'a str, marker: &str, key: &str) -> Option<&'a str> {
    let line = log.lines().find(|line| line.contains(marker))?;
    let rest = &line[line.find(key)? + key.len()..];
    Some(rest.split_whitespace().next().unwrap_or(rest))
}

/// Seconds since midnight of the first log line containing `marker`, from its
/// `2026-11-24T08:30:00.123456Z` timestamp.
fn line_time(log: &str, marker: &str) -> Option<f64> {
    let line = log.lines().find(|line| line.contains(marker))?;
    let time = line.split_whitespace().next()?.split('T').nth(1)?;
    let time = time.trim_end_matches('Z');
    let mut parts = time.split(':');
    let hours: f64 = parts.next()?.parse().ok()?;
    let minutes: f64 = parts.next()?.parse().ok()?;
    let seconds: f64 = parts.next()?.parse().ok()?;
    Some(hours * 3600.0 + minutes * 60.0 + seconds)
}

/// The median rate of `runs` (the mean of the middle two for an even count).
fn median_rate(runs: &[Drain], events: u64) -> f64 {
    let mut rates: Vec<f64> = runs.iter().map(|drain| drain.rate(events)).collect();
    rates.sort_by(f64::total_cmp);
    match rates.len() {
        0 => 0.0,
        len if len % 2 == 1 => rates[len / 2],
        len => (rates[len / 2 - 1] + rates[len / 2]) / 2.0,
    }
}

fn fastest(runs: &[Drain]) -> Result<&Drain> {
    runs.iter()
        .min_by_key(|drain| drain.wall)
        .context("no runs")
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
