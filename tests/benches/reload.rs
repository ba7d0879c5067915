//! The swap latency of a hot reload, against the restart it replaces, in one run.
//!
//! One `serve` pipeline (the tagged test handler into a jsonl file) under a steady write load
//! of one small transaction every 2 ms. **Reload:** the plugin file is replaced by the other
//! version (v1 and v2 in turn) and the host gets SIGHUP; the host logs, for each reload, the
//! milliseconds from the signal's arrival to the end of the first batch on the new version
//! (`swap_latency_ms`). **Restart:** the reference, what an operator does without hot reload:
//! SIGTERM, start the host again on the replaced file, and time from the SIGTERM until the
//! sink holds a line from the new version. Printed: each figure's median and maximum, and the
//! ratio of the medians.
//!
//! Run with `make bench` (the release host).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use pgstream_e2e::tenants::{SOURCE_DSN_VAR, jsonl, write_config};
use pgstream_e2e::{HostProcess, PgServer, PgVersion, TestDb, plugin_path};
use tempfile::TempDir;

/// Reloads timed.
const RELOADS: usize = 10;
/// Restarts timed (each costs seconds).
const RESTARTS: usize = 3;
/// Longest wait for one swap or restart.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    println!("starting PostgreSQL 18");
    let server = PgServer::start(PgVersion::Pg18)?;
    let db = server.create_database().await;
    db.exec("CREATE TABLE docs (id bigint PRIMARY KEY, content text)")
        .await;
    let folder = TempDir::new()?;
    let plugin = folder.path().join("handler.wasm");
    let sink = folder.path().join("docs.jsonl");
    deploy("v1", &plugin)?;
    let config = write_config(
        folder.path(),
        "",
        &[format!(
            "[[pipeline]]
name = \"docs\"
source = \"db\"
tables = [\"docs\"]
plugin = \"{}\"
embedder = \"none\"
sink = \"file\"
collection = \"{}\"
batch_wait_ms = 20
",
            plugin.display(),
            sink.display()
        )],
    );
    let (stop_writes, stopping) = tokio::sync::watch::channel(false);
    let writer = tokio::spawn(steady_writes(db.connect().await, stopping));

    let mut host = start(&config, &db);
    host.wait_for_log(" streaming ", STEP_TIMEOUT).await?;
    let mut version = "v1";
    let mut swaps = Vec::new();
    for _ in 0..RELOADS {
        version = other(version);
        deploy(version, &plugin)?;
        let seen = swap_lines(&host.log()).len();
        host.hang_up()?;
        let started = Instant::now();
        let latency = loop {
            if let Some(latency) = swap_lines(&host.log()).get(seen) {
                break *latency;
            }
            if started.elapsed() > STEP_TIMEOUT {
                bail!(
                    "no swap to {version} within {STEP_TIMEOUT:?}:\n{}",
                    host.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        swaps.push(Duration::from_millis(latency));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let mut restarts = Vec::new();
    for _ in 0..RESTARTS {
        version = other(version);
        deploy(version, &plugin)?;
        let lines_before = jsonl(&sink).len();
        let started = Instant::now();
        host.terminate(STEP_TIMEOUT).await?;
        host = start(&config, &db);
        loop {
            let lines = jsonl(&sink);
            let new_version = lines[lines_before.min(lines.len())..]
                .iter()
                .any(|line| line["payload"]["handler"] == version);
            if new_version {
                break;
            }
            if started.elapsed() > STEP_TIMEOUT {
                bail!("no line from {version} after the restart:\n{}", host.log());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        restarts.push(started.elapsed());
    }
    stop_writes.send(true)?;
    let written = writer.await??;
    host.terminate(STEP_TIMEOUT).await?;

    let (swap_median, swap_max) = median_and_max(&mut swaps);
    let (restart_median, restart_max) = median_and_max(&mut restarts);
    println!("under a steady load ({written} transactions written):");
    println!(
        "  hot reload (SIGHUP to first batch on the new version), {RELOADS} runs: median {:.1} ms, max {:.1} ms",
        ms(swap_median),
        ms(swap_max)
    );
    println!(
        "  restart (SIGTERM to first line of the new version), {RESTARTS} runs: median {:.1} ms, max {:.1} ms",
        ms(restart_median),
        ms(restart_max)
    );
    println!(
        "  reload / restart: {:.3}x",
        swap_median.as_secs_f64() / restart_median.as_secs_f64()
    );
    Ok(())
}

fn other(version: &str) -> &'static str {
    if version == "v1" { "v2" } else { "v1" }
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn median_and_max(figures: &mut [Duration]) -> (Duration, Duration) {
    figures.sort();
    (figures[figures.len() / 2], figures[figures.len() - 1])
}

/// Replaces `target` with the tagged handler of `version`, renamed into place.
fn deploy(version: &str, target: &Path) -> Result<()> {
    let staged = target.with_extension("wasm.new");
    std::fs::copy(plugin_path(&format!("tagged-handler-{version}")), &staged)?;
    std::fs::rename(&staged, target).context("replace the plugin")
}

fn start(config: &Path, db: &TestDb) -> HostProcess {
    let mut host = HostProcess::command();
    host.args(["serve", "--config"])
        .arg(config)
        .env(SOURCE_DSN_VAR, db.dsn());
    HostProcess::spawn(host).expect("start the host")
}

/// The `swap_latency_ms` of each "first batch handled by the reloaded plugin" line, in order.
fn swap_lines(log: &str) -> Vec<u64> {
    log.lines()
        .filter(|line| line.contains("first batch handled by the reloaded plugin"))
        .filter_map(|line| {
            let (_, rest) = line.split_once("swap_latency_ms=")?;
            rest.split(' ').next()?.trim().parse().ok()
        })
        .collect()
}

/// One insert every 2 ms until told to stop; returns how many.
async fn steady_writes(
    client: tokio_postgres::Client,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<u64> {
    let mut id = 0u64;
    while !*stop.borrow() {
        id += 1;
        client
            .batch_execute(&format!("INSERT INTO docs VALUES ({id}, 'row {id}')"))
            .await?;
        tokio::select! {
            _ = stop.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(2)) => {}
        }
    }
    Ok(id)
}
