//! What the handler's language costs: for the no-op handler of every language `pgstream-host
//! new` supports, the component's size, its cold start, and the events per second the release
//! host reaches with it, as a ratio to the Rust no-op handler measured in the same run.
//!
//! - Cold start, in process with the host's own runtime: compiling the component with an
//!   empty cache (a first start, or a new plugin version), loading it from the precompiled
//!   cache (every later start), and instantiating it (done at start and after a failed batch).
//! - Throughput: the release host drains the standard workload (`pgstream_e2e::drain`; 20,000
//!   inserts, 10,000 updates, 2,000 deletes in transactions of 100) with each no-op handler,
//!   no embedder and the JSON-lines sink, best of `PGSTREAM_BENCH_RUNS` (default 3) runs,
//!   wall clock from process start to exit with the compiled component cached.
//!
//! `js` is the QuickJS build every JavaScript handler gets; `js-sm` the same no-op on
//! StarlingMonkey, measured to keep the choice of engine honest.
//!
//! `PGSTREAM_BENCH_SCALE` divides the row counts. Run with `make bench`.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use async_trait::async_trait;
use pgstream_e2e::drain::{
    Drain, StandardWorkload, create_slot, current_wal_lsn, drain_host, fastest,
};
use pgstream_e2e::{PgServer, PgVersion, TestDb, plugin_path};
use pgstream_host::point::{Point, PointKey};
use pgstream_host::runtime::{EngineOptions, HostImports, ImportError, Limits, PluginEngine};

/// The publication every slot streams.
const PUBLICATION: &str = "bench_pub";
/// A drain that takes longer than this has hung.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(900);

/// (language, no-op component), the reference first. JavaScript twice: QuickJS (the default,
/// componentize-qjs) and StarlingMonkey (componentize-js), the engine it was chosen over.
const NOOP_HANDLERS: [(&str, &str); 5] = [
    ("rust", "noop-handler"),
    ("python", "python-noop"),
    ("js", "js-noop"),
    ("js-sm", "js-noop-starlingmonkey"),
    ("c", "c-noop"),
];

/// Host imports for the cold-start measurement: a no-op handler never calls them.
struct Unreachable;

#[async_trait]
impl HostImports for Unreachable {
    async fn embed(&self, _: Vec<String>) -> Result<Vec<Vec<f32>>, ImportError> {
        Err(ImportError::refused("the benchmark gives no embedder"))
    }
    async fn upsert(&self, _: Vec<Point>) -> Result<(), ImportError> {
        Err(ImportError::refused("the benchmark gives no sink"))
    }
    async fn merge(&self, _: Vec<Point>) -> Result<(), ImportError> {
        Err(ImportError::refused("the benchmark gives no sink"))
    }
    async fn delete(&self, _: Vec<PointKey>) -> Result<(), ImportError> {
        Err(ImportError::refused("the benchmark gives no sink"))
    }
    async fn delete_table(&self, _: String, _: String) -> Result<(), ImportError> {
        Err(ImportError::refused("the benchmark gives no sink"))
    }
}

/// One language's figures.
struct Figures {
    language: &'static str,
    size: u64,
    compile: Duration,
    cached_load: Duration,
    instantiate: Duration,
    best: Drain,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let scale: i64 = env_number("PGSTREAM_BENCH_SCALE", 1)?;
    let runs: usize = env_number("PGSTREAM_BENCH_RUNS", 3)?;
    let workload = StandardWorkload {
        inserts: 20_000 / scale,
        updates: 10_000 / scale,
        deletes: 2_000 / scale,
    };
    let scratch = tempfile::Builder::new()
        .prefix("pgstream-bench-languages-")
        .tempdir()?;

    println!("cold start (in process, the host's runtime and default limits):");
    let mut cold = Vec::new();
    for (language, component) in NOOP_HANDLERS {
        let path = plugin_path(component);
        let (compile, cached_load, instantiate) =
            cold_start(&path, &scratch.path().join(format!("cache-{language}"))).await?;
        let size = std::fs::metadata(&path)?.len();
        println!(
            "  {language:<7} {:>8.1} KiB  compile {:>7.1} ms  cached load {:>6.1} ms  \
             instantiate {:>6.1} ms",
            size as f64 / 1024.0,
            ms(compile),
            ms(cached_load),
            ms(instantiate)
        );
        cold.push((language, component, size, compile, cached_load, instantiate));
    }

    println!("starting PostgreSQL 18");
    let server = PgServer::start(PgVersion::Pg18)?;
    let db = server.create_database().await;
    db.client()
        .batch_execute(&format!(
            "CREATE TABLE docs (id bigint PRIMARY KEY, title text, content text);\n\
             CREATE PUBLICATION {PUBLICATION} FOR TABLE docs;"
        ))
        .await?;
    for (language, ..) in NOOP_HANDLERS {
        for run in 0..=runs {
            create_slot(&db, &slot_name(language, run)).await?;
        }
    }
    println!(
        "writing {} inserts, {} updates, {} deletes",
        workload.inserts, workload.updates, workload.deletes
    );
    workload.write(&db).await?;
    let end = current_wal_lsn(&db).await?;

    let mut figures = Vec::new();
    for (language, component, size, compile, cached_load, instantiate) in cold {
        let plugin = plugin_path(component);
        let cache = scratch.path().join("host-cache");
        // Run 0 compiles into the host's cache; the measured runs load from it.
        drain(
            &db,
            &plugin,
            &cache,
            &slot_name(language, 0),
            &end,
            &workload,
        )
        .await?;
        let mut drains = Vec::new();
        for run in 1..=runs {
            let drain = drain(
                &db,
                &plugin,
                &cache,
                &slot_name(language, run),
                &end,
                &workload,
            )
            .await?;
            println!(
                "  {language:<7} run {run}: {:.2} s, {:.0} events/s, peak RSS {} MiB",
                drain.wall.as_secs_f64(),
                drain.rate(workload.events()),
                drain.peak_rss_kib.unwrap_or(0) / 1024
            );
            drains.push(drain);
        }
        figures.push(Figures {
            language,
            size,
            compile,
            cached_load,
            instantiate,
            best: fastest(&drains)?.clone(),
        });
    }

    let events = workload.events();
    let reference = figures
        .first()
        .map(|rust| rust.best.rate(events))
        .context("no figures")?;
    println!();
    println!("no-op handler per language ({events} events, best of {runs} runs; ratio to Rust):");
    println!(
        "  language  size KiB  compile ms  cached ms  instantiate ms  events/s  ratio  peak RSS MiB"
    );
    for figure in &figures {
        let rate = figure.best.rate(events);
        println!(
            "  {:<8} {:>9.1} {:>11.1} {:>10.1} {:>15.1} {:>9.0} {:>5.2}x {:>13}",
            figure.language,
            figure.size as f64 / 1024.0,
            ms(figure.compile),
            ms(figure.cached_load),
            ms(figure.instantiate),
            rate,
            rate / reference,
            figure.best.peak_rss_kib.unwrap_or(0) / 1024
        );
    }
    Ok(())
}

/// Compile with an empty cache, load from the cache, instantiate: the time of each.
async fn cold_start(component: &Path, cache: &Path) -> Result<(Duration, Duration, Duration)> {
    let options = || EngineOptions {
        cache_dir: Some(cache.to_path_buf()),
    };
    let engine = PluginEngine::new(options())?;
    let started = Instant::now();
    engine.load(component)?;
    let compile = started.elapsed();
    ensure!(
        engine.cached_artifact(component).is_some(),
        "compiling {} left nothing in the cache",
        component.display()
    );

    let engine = PluginEngine::new(options())?;
    let started = Instant::now();
    let plugin = engine.load(component)?;
    let cached_load = started.elapsed();

    let started = Instant::now();
    let instance = plugin
        .instantiate(Arc::new(Unreachable), Limits::default(), "bench/noop")
        .await?;
    let instantiate = started.elapsed();
    drop(instance);
    Ok((compile, cached_load, instantiate))
}

/// The release host with `plugin`, no embedder and the JSON-lines sink, on `slot` to `end`.
async fn drain(
    db: &TestDb,
    plugin: &Path,
    cache: &Path,
    slot: &str,
    end: &str,
    workload: &StandardWorkload,
) -> Result<Drain> {
    let sink = cache.with_file_name(format!("{slot}.jsonl"));
    let args: Vec<String> = [
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
        &sink.display().to_string(),
        "--cache-dir",
        &cache.display().to_string(),
        "--stop-at-lsn",
        end,
        "--progress-secs",
        "3600",
    ]
    .iter()
    .map(|arg| arg.to_string())
    .collect();
    drain_host(&args, workload.events(), DRAIN_TIMEOUT).await
}

/// The slot of `language`'s run `run` (slot names take lowercase letters, digits and `_`).
fn slot_name(language: &str, run: usize) -> String {
    format!("{}_{run}", language.replace('-', "_"))
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn env_number<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
    match std::env::var(name) {
        Ok(text) => text
            .parse()
            .ok()
            .with_context(|| format!("{name} must be a whole number, not {text:?}")),
        Err(_) => Ok(default),
    }
}
