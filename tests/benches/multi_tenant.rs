//! Many pipelines in one `serve` process, and one pipeline across two: the figures issue 10
//! asks for, each against a reference measured in the same run.
//!
//! - **Hostile neighbours.** Four well-behaved pipelines (the trap handler writing each row's
//!   JSON to a jsonl file) drain `ROWS` new rows each, first alone, then beside one hostile
//!   pipeline of each kind: a handler that loops, eats memory, traps on every batch, asks to
//!   embed 100,000 texts per call, floods the log (`hostile-handler`), or a sink that never
//!   answers (a Qdrant URL whose port accepts connections and says nothing). The hostile
//!   pipeline gets the limits a platform would give a tenant (1 s per call, 64 MiB) and is
//!   already misbehaving when the timed writes start. Printed: the four's events/s in each
//!   case and the ratio to alone (goal: at least 0.90).
//! - **Scale.** 50 pipelines, each its own table, slot and file, against one pipeline: the time
//!   from spawn until every pipeline streams, the resident memory once idle (and so per idle
//!   pipeline: the difference over 49), and the events/s draining the same number of rows
//!   spread over the 50 tables or in the one.
//! - **Takeover.** A second `serve` stands by; the active one is SIGKILLed; seconds from the
//!   kill until the standby has written a row committed after it (three runs).
//!
//! Rows are written after every pipeline streams, in one transaction per table, and the clock
//! runs from the first write until the last row is in its file. Run with `make bench` (the
//! release host); `PGSTREAM_BENCH_SCALE=10` divides the row counts by 10, and
//! `PGSTREAM_BENCH_ONLY=hostile|scale|takeover` runs one part.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use pgstream_e2e::drain::{bench_scale, rss_kib};
use pgstream_e2e::tenants::{jsonl_pipeline, pipeline, start_host, upserted_ids, write_config};
use pgstream_e2e::{HostProcess, PgServer, PgVersion, TestDb};
use tempfile::TempDir;

/// Rows each well-behaved neighbour drains (before scaling).
const NEIGHBOUR_ROWS: i64 = 200_000;
/// Rows of the scale part in all (before scaling), spread over the pipelines.
const SCALE_ROWS: i64 = 100_000;
/// Pipelines of the scale part.
const MANY: usize = 50;
/// Longest wait for every pipeline of a config to stream.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest wait for a drain.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(900);
/// The hostile kinds, as `hostile-handler` spells them, and `hang` for the silent sink.
const HOSTILE_KINDS: [&str; 6] = ["loop", "hog", "trap", "embed-flood", "log-flood", "hang"];

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let scale = bench_scale()?;
    let only = std::env::var("PGSTREAM_BENCH_ONLY").ok();
    let wants = |part: &str| only.as_deref().is_none_or(|only| only == part);

    println!("starting PostgreSQL 18");
    let server = PgServer::start(PgVersion::Pg18)?;
    if wants("hostile") {
        hostile_neighbours(&server, NEIGHBOUR_ROWS / scale).await?;
    }
    if wants("scale") {
        many_pipelines(&server, SCALE_ROWS / scale).await?;
    }
    if wants("takeover") {
        takeover(&server).await?;
    }
    Ok(())
}

async fn hostile_neighbours(server: &PgServer, rows: i64) -> Result<()> {
    println!("\nhostile neighbours: 4 pipelines draining {rows} rows each");
    let hole = BlackHole::start().await?;
    let alone = neighbours_rate(server, rows, None, hole.port).await?;
    println!("  alone                {alone:>8.0} events/s");
    for kind in HOSTILE_KINDS {
        let beside = neighbours_rate(server, rows, Some(kind), hole.port).await?;
        println!(
            "  beside {kind:<13} {beside:>8.0} events/s  {:.2}x alone (goal >= 0.90)",
            beside / alone
        );
    }
    Ok(())
}

/// Events/s of four good pipelines draining `rows` each, beside the `hostile` kind if any.
async fn neighbours_rate(
    server: &PgServer,
    rows: i64,
    hostile: Option<&str>,
    hang_port: u16,
) -> Result<f64> {
    let db = server.create_database().await;
    let folder = TempDir::new()?;
    let good: Vec<String> = (1..=4).map(|n| format!("good_{n}")).collect();
    let mut tables = good.clone();
    tables.extend(hostile.map(|_| "hostile".to_owned()));
    create_tables(&db, &tables).await;
    let sinks: Vec<PathBuf> = good.iter().map(|name| sink_file(&folder, name)).collect();
    let mut pipelines: Vec<String> = good
        .iter()
        .zip(&sinks)
        .map(|(name, sink)| jsonl_pipeline(name, name, "trap-handler", sink, ""))
        .collect();
    let mut blocks = String::new();
    let mut streaming = good.clone();
    match hostile {
        None => {}
        Some("hang") => {
            blocks = format!(
                "[sinks.hang]\nkind = \"qdrant\"\nurl = \"http://127.0.0.1:{hang_port}\"\n\
                 timeout_ms = 1000\nmax_attempts = 1\n"
            );
            pipelines.push(pipeline(
                "hostile",
                "hostile",
                "trap-handler",
                "hang",
                "docs",
                "",
            ));
        }
        Some(kind) => {
            // The flood is a million host calls per batch: more than a second.
            let limits = match kind {
                "log-flood" => "memory_limit_mb = 64",
                _ => "call_timeout_ms = 1000\nmemory_limit_mb = 64",
            };
            let sink = sink_file(&folder, "hostile");
            pipelines.push(jsonl_pipeline(
                "hostile",
                "hostile",
                "hostile-handler",
                &sink,
                limits,
            ));
            streaming.push("hostile".to_owned());
        }
    }
    let config = write_config(folder.path(), &blocks, &pipelines);
    let mut serve = start_host("serve", &config, &db);
    wait_streaming(&serve, &streaming).await?;
    match hostile {
        None | Some("hang") => {}
        Some("log-flood") => {
            // A batch each, so the flood goes on through the whole drain.
            for id in 1..=30 {
                db.exec(&format!("INSERT INTO hostile VALUES ({id}, 'log-flood')"))
                    .await;
            }
        }
        Some(kind) => {
            db.exec(&format!("INSERT INTO hostile VALUES (1, '{kind}')"))
                .await
        }
    }
    if hostile.is_some() {
        // Under way before the clock starts.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let started = Instant::now();
    for table in &good {
        insert_rows(&db, table, 1..=rows).await;
    }
    wait_for_lines(&sinks, rows as usize, &serve).await?;
    let elapsed = started.elapsed();
    stop(&mut serve, &db).await?;
    Ok((good.len() as i64 * rows) as f64 / elapsed.as_secs_f64())
}

async fn many_pipelines(server: &PgServer, rows: i64) -> Result<()> {
    println!("\nscale: {MANY} pipelines against 1, {rows} rows in all");
    let one = pipelines_run(server, 1, rows).await?;
    let many = pipelines_run(server, MANY, rows / MANY as i64).await?;
    for (label, run) in [("1 pipeline  ", &one), ("50 pipelines", &many)] {
        println!(
            "  {label}  all streaming {:>5.2} s after spawn, idle RSS {:>6.1} MiB, {:>8.0} events/s",
            run.startup.as_secs_f64(),
            run.idle_rss_kib as f64 / 1024.0,
            run.rate
        );
    }
    let per_pipeline =
        (many.idle_rss_kib as f64 - one.idle_rss_kib as f64) / (MANY - 1) as f64 / 1024.0;
    println!(
        "  RSS per idle pipeline {per_pipeline:.2} MiB (goal < 5); events/s 50 vs 1: {:.2}x",
        many.rate / one.rate
    );
    Ok(())
}

/// What one scale run measured.
struct PipelinesRun {
    startup: Duration,
    idle_rss_kib: u64,
    rate: f64,
}

/// `count` pipelines, each on its own table, each draining `rows` rows.
async fn pipelines_run(server: &PgServer, count: usize, rows: i64) -> Result<PipelinesRun> {
    let db = server.create_database().await;
    let folder = TempDir::new()?;
    let names: Vec<String> = (0..count).map(|n| format!("tenant_{n:02}")).collect();
    create_tables(&db, &names).await;
    let sinks: Vec<PathBuf> = names.iter().map(|name| sink_file(&folder, name)).collect();
    let pipelines: Vec<String> = names
        .iter()
        .zip(&sinks)
        .map(|(name, sink)| jsonl_pipeline(name, name, "trap-handler", sink, ""))
        .collect();
    let config = write_config(folder.path(), "", &pipelines);
    let spawned = Instant::now();
    let mut serve = start_host("serve", &config, &db);
    wait_streaming(&serve, &names).await?;
    let startup = spawned.elapsed();
    // Settled: connections made, first progress lines out.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_rss_kib = rss_kib(serve.pid()).context("the host's memory")?;
    let started = Instant::now();
    for table in &names {
        insert_rows(&db, table, 1..=rows).await;
    }
    wait_for_lines(&sinks, rows as usize, &serve).await?;
    let rate = (count as i64 * rows) as f64 / started.elapsed().as_secs_f64();
    stop(&mut serve, &db).await?;
    Ok(PipelinesRun {
        startup,
        idle_rss_kib,
        rate,
    })
}

async fn takeover(server: &PgServer) -> Result<()> {
    println!("\ntakeover: SIGKILL of the active host until the standby writes new rows");
    let mut seconds = Vec::new();
    for run in 1..=3 {
        let db = server.create_database().await;
        let folder = TempDir::new()?;
        create_tables(&db, &["docs".to_owned()]).await;
        let sink = sink_file(&folder, "docs");
        let config = write_config(
            folder.path(),
            "",
            &[jsonl_pipeline("docs", "docs", "trap-handler", &sink, "")],
        );
        let mut active = start_host("serve", &config, &db);
        wait_streaming(&active, &["docs".to_owned()]).await?;
        let mut standby = start_host("serve", &config, &db);
        standby.wait_for_log("standing by", STARTUP_TIMEOUT).await?;
        insert_rows(&db, "docs", 1..=100).await;
        wait_for_lines(std::slice::from_ref(&sink), 100, &active).await?;
        active.kill().await?;
        let killed = Instant::now();
        insert_rows(&db, "docs", 101..=200).await;
        let deadline = killed + DRAIN_TIMEOUT;
        while !upserted_ids(&sink).contains(&200) {
            if Instant::now() > deadline {
                bail!("the standby never took over:\n{}", standby.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let took = killed.elapsed();
        ensure!(
            upserted_ids(&sink) == (1..=200).collect::<BTreeSet<i64>>(),
            "rows were lost in the takeover"
        );
        println!("  run {run}: {:.2} s", took.as_secs_f64());
        seconds.push(took.as_secs_f64());
        stop(&mut standby, &db).await?;
    }
    seconds.sort_by(f64::total_cmp);
    println!(
        "  median {:.2} s (goal: within 30 s; the standby tries the lease every 3 s)",
        seconds[seconds.len() / 2]
    );
    Ok(())
}

/// A TCP port that accepts connections and never answers.
struct BlackHole {
    port: u16,
    _task: tokio::task::JoinHandle<()>,
}

impl BlackHole {
    async fn start() -> Result<BlackHole> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        Ok(BlackHole { port, _task: task })
    }
}

fn sink_file(folder: &TempDir, name: &str) -> PathBuf {
    folder.path().join(format!("{name}.jsonl"))
}

async fn create_tables(db: &TestDb, names: &[String]) {
    let ddl: String = names
        .iter()
        .map(|name| format!("CREATE TABLE {name} (id int PRIMARY KEY, content text);"))
        .collect();
    db.exec(&ddl).await;
}

/// One transaction of rows `ids` with ~100 bytes of content each.
async fn insert_rows(db: &TestDb, table: &str, ids: std::ops::RangeInclusive<i64>) {
    db.exec(&format!(
        "INSERT INTO {table} SELECT g, repeat(md5(g::text), 3) FROM generate_series({}, {}) g",
        ids.start(),
        ids.end()
    ))
    .await;
}

/// Waits until the log says each of `names` streams.
async fn wait_streaming(host: &HostProcess, names: &[String]) -> Result<()> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        let log = host.log();
        let started: BTreeSet<&str> = log
            .lines()
            .filter(|line| line.contains(" streaming pipeline="))
            .filter_map(|line| line.split(" pipeline=").nth(1)?.split(' ').next())
            .collect();
        if names.iter().all(|name| started.contains(name.as_str())) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("not every pipeline streams:\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until every file in `sinks` holds at least `lines` lines.
async fn wait_for_lines(sinks: &[PathBuf], lines: usize, host: &HostProcess) -> Result<()> {
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    while !sinks.iter().all(|sink| line_count(sink) >= lines) {
        if Instant::now() > deadline {
            bail!("the drain did not finish:\n{}", host.log());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

fn line_count(path: &Path) -> usize {
    std::fs::read(path)
        .map(|bytes| bytes.iter().filter(|byte| **byte == b'\n').count())
        .unwrap_or(0)
}

/// Stops the host, then drops its run's slots: the server's slots are shared by every run.
async fn stop(host: &mut HostProcess, db: &TestDb) -> Result<()> {
    let status = host.terminate(Duration::from_secs(60)).await?;
    ensure!(
        status.success(),
        "the host did not stop cleanly:\n{}",
        host.log()
    );
    db.exec(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
         WHERE database = current_database()",
    )
    .await;
    Ok(())
}
