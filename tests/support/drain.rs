//! Shared parts of the benchmarks (`tests/benches/`): the standard workload, draining a slot
//! with the real host while reading its peak memory and CPU time, and the arithmetic of the
//! figures they print.
//!
//! The standard workload is a `docs(id bigint PRIMARY KEY, title text, content text)` table
//! that gets inserts, then updates and deletes of some inserted rows, in transactions of
//! [`ROWS_PER_TRANSACTION`] rows, with about 100 bytes of content per row.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

use crate::host_process::HostProcess;
use crate::postgres::TestDb;

/// Rows per transaction of the standard workload.
pub const ROWS_PER_TRANSACTION: i64 = 100;
/// How often the host's peak RSS and CPU time are read while it runs.
const PROCESS_POLL: Duration = Duration::from_millis(10);

/// How many rows of `docs` the standard workload inserts, then updates, then deletes.
#[derive(Debug, Clone, Copy)]
pub struct StandardWorkload {
    /// Rows inserted, ids 1..=inserts.
    pub inserts: i64,
    /// Rows updated (new content), ids 1..=updates.
    pub updates: i64,
    /// Rows deleted, the ids right after the updated ones.
    pub deletes: i64,
}

impl StandardWorkload {
    /// Every change the workload makes: the events a drain hands to the handler.
    pub fn events(&self) -> u64 {
        u64::try_from(self.inserts + self.updates + self.deletes).unwrap_or(0)
    }

    /// The changes that carry a `content` to embed (inserts and updates).
    pub fn texts(&self) -> u64 {
        u64::try_from(self.inserts + self.updates).unwrap_or(0)
    }

    /// The content the workload gives row `id` when inserting it, as Postgres computes it.
    pub const INSERTED_CONTENT: &'static str = "rpad(md5(g::text), 100, md5((g * 7)::text))";

    /// Writes the workload into `docs`, each statement of [`ROWS_PER_TRANSACTION`] rows its
    /// own transaction.
    pub async fn write(&self, db: &TestDb) -> Result<()> {
        let client = db.client();
        let insert = client
            .prepare(&format!(
                "INSERT INTO docs (id, title, content) SELECT g, 'title ' || g, {} \
                 FROM generate_series($1::bigint, $2::bigint) AS g",
                Self::INSERTED_CONTENT
            ))
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
            (&insert, 1, self.inserts),
            (&update, 1, self.updates),
            // Deletes take rows the updates did not touch.
            (&delete, self.updates + 1, self.deletes),
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
            written == self.events(),
            "the workload touched {written} rows, expected {}",
            self.events()
        );
        Ok(())
    }
}

/// Creates the logical slot `slot` (pgoutput) at the current WAL position.
pub async fn create_slot(db: &TestDb, slot: &str) -> Result<()> {
    db.client()
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await
        .with_context(|| format!("creating slot {slot}"))?;
    Ok(())
}

/// The server's current WAL position, as text (`0/16B3748`).
pub async fn current_wal_lsn(db: &TestDb) -> Result<String> {
    Ok(db
        .client()
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0))
}

/// How one drain went.
#[derive(Debug, Clone)]
pub struct Drain {
    /// Process start to exit.
    pub wall: Duration,
    /// Host only: from its "streaming" log line to its "reached --stop-at-lsn" line.
    pub streaming: Option<Duration>,
    /// Host only: the highest `VmHWM` read while it ran, in KiB.
    pub peak_rss_kib: Option<u64>,
    /// Host only: user + system CPU time at the last read before it exited.
    pub cpu: Option<Duration>,
    /// Host only: everything it logged.
    pub log: String,
}

impl Drain {
    /// A drain measured from outside only (another program than the host).
    pub fn timed(wall: Duration) -> Drain {
        Drain {
            wall,
            streaming: None,
            peak_rss_kib: None,
            cpu: None,
            log: String::new(),
        }
    }

    /// `events` per second of wall clock.
    pub fn rate(&self, events: u64) -> f64 {
        events as f64 / self.wall.as_secs_f64()
    }
}

/// Runs the host binary (`PGSTREAM_HOST_BIN`, else the one next to the running bench) with
/// `args`, which must include `--stop-at-lsn`, until it exits; reads its peak RSS and CPU time
/// while it runs and checks it exited 0 having handled `expected_events` events.
pub async fn drain_host(args: &[String], expected_events: u64, timeout: Duration) -> Result<Drain> {
    let mut command = HostProcess::command();
    command.args(args).env("NO_COLOR", "1");
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
            started.elapsed() < timeout,
            "the host did not finish within {timeout:?}; its log:\n{}",
            host.log()
        );
        tokio::time::sleep(PROCESS_POLL).await;
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
        log,
    })
}

/// `PGSTREAM_BENCH_SCALE`: what a bench divides its row counts by for a quick try (default 1).
pub fn bench_scale() -> Result<i64> {
    let scale: i64 = match std::env::var("PGSTREAM_BENCH_SCALE") {
        Ok(text) => text
            .parse()
            .context("PGSTREAM_BENCH_SCALE is a whole number")?,
        Err(_) => 1,
    };
    ensure!(scale >= 1, "PGSTREAM_BENCH_SCALE must be at least 1");
    Ok(scale)
}

/// `VmHWM:  12345 kB` from `/proc/<pid>/status`.
pub fn vm_hwm_kib(status: &str) -> Option<u64> {
    status_kib(status, "VmHWM:")
}

/// A `<field>  12345 kB` line of `/proc/<pid>/status`, in KiB.
fn status_kib(status: &str, field: &str) -> Option<u64> {
    let line = status.lines().find(|line| line.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The resident memory (`VmRSS`) of process `pid` now, in KiB; `None` once it has exited.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status_kib(&status, "VmRSS:")
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
pub fn field_of_line<'a>(log: &'a str, marker: &str, key: &str) -> Option<&'a str> {
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
pub fn median_rate(runs: &[Drain], events: u64) -> f64 {
    let mut rates: Vec<f64> = runs.iter().map(|drain| drain.rate(events)).collect();
    rates.sort_by(f64::total_cmp);
    match rates.len() {
        0 => 0.0,
        len if len % 2 == 1 => rates[len / 2],
        len => (rates[len / 2 - 1] + rates[len / 2]) / 2.0,
    }
}

/// The run with the shortest wall clock.
pub fn fastest(runs: &[Drain]) -> Result<&Drain> {
    runs.iter()
        .min_by_key(|drain| drain.wall)
        .context("no runs")
}
