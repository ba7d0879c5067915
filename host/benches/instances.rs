//! Does wasmtime's pooling allocator help a host of many pipelines? Each pipeline keeps one
//! handler instance alive and makes a new one only after a failure, so what the allocator can
//! change is the cost of making those instances: at start-up (50 at once), on a restart storm
//! (all of them replaced), and the memory they hold while idle.
//!
//! Both allocators instantiate the same component (the no-op handler, `noop-handler.wasm` from
//! `PGSTREAM_PLUGIN_DIR` or `target/wasm`) `COUNT` times, one store each as the host does, with
//! the host's default memory limit as the pool's slot size. Printed per allocator: the time for
//! the first `COUNT` instances, the time to replace all of them, and the resident memory they
//! add. Run with `make bench` or `cargo bench -p pgstream-host --bench instances`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

/// Instances kept alive at once: one per pipeline.
const COUNTS: [u32; 2] = [50, 200];

/// The host's default memory limit per handler instance (`memory_limit_mb`).
const MEMORY_LIMIT: usize = 256 * 1024 * 1024;

struct State {
    wasi: WasiCtx,
    table: ResourceTable,
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

fn engine(pooling: Option<u32>) -> Engine {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    if let Some(count) = pooling {
        let mut pool = PoolingAllocationConfig::new();
        pool.total_component_instances(count)
            .total_core_instances(count * 8)
            .total_memories(count * 2)
            .total_tables(count * 4)
            .total_stacks(count)
            .max_memory_size(MEMORY_LIMIT);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    }
    Engine::new(&config).expect("an engine")
}

fn component_path() -> PathBuf {
    let dir = std::env::var_os("PGSTREAM_PLUGIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/wasm"));
    dir.join("noop-handler.wasm")
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .and_then(|line| line.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// What one allocator measured for one count.
struct Figures {
    first: Duration,
    replace: Duration,
    rss_kib: u64,
}

async fn measure(engine: &Engine, bytes: &[u8], count: u32) -> Figures {
    let component = Component::from_binary(engine, bytes).expect("the component compiles");
    let mut linker = Linker::<State>::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker).expect("WASI links");
    // The handler's `host` imports are not called here; instantiation is what is measured.
    linker
        .define_unknown_imports_as_traps(&component)
        .expect("stand-ins for the host imports");
    let pre = linker
        .instantiate_pre(&component)
        .expect("pre-instantiates");

    let make = || async {
        let mut store = Store::new(
            engine,
            State {
                wasi: WasiCtx::builder().build(),
                table: ResourceTable::new(),
            },
        );
        store.set_epoch_deadline(u64::MAX / 2);
        let instance = pre
            .instantiate_async(&mut store)
            .await
            .expect("instantiates");
        (store, instance)
    };

    let before = rss_kib();
    let started = Instant::now();
    let mut live = Vec::with_capacity(count as usize);
    for _ in 0..count {
        live.push(make().await);
    }
    let first = started.elapsed();
    let rss_kib = rss_kib().saturating_sub(before);
    let started = Instant::now();
    for slot in live.iter_mut() {
        // The old instance goes first, as when a pipeline replaces a failed one.
        drop(std::mem::replace(slot, make().await));
    }
    let replace = started.elapsed();
    drop(live);
    Figures {
        first,
        replace,
        rss_kib,
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let path = component_path();
    let bytes = std::fs::read(&path)
        .unwrap_or_else(|error| panic!("{}: {error}; run `make guests`", path.display()));
    println!(
        "instances of {} ({} KiB)",
        path.display(),
        bytes.len() / 1024
    );
    for count in COUNTS {
        let on_demand = measure(&engine(None), &bytes, count).await;
        // One slot spare: a replacement is made before the instance it replaces is dropped.
        let pooling = measure(&engine(Some(count + 1)), &bytes, count).await;
        for (label, figures) in [("on-demand", &on_demand), ("pooling  ", &pooling)] {
            println!(
                "  {count:>3} instances, {label}: first {:>7.2} ms ({:.0} us each), replace all \
                 {:>7.2} ms, +{:.1} MiB RSS ({:.0} KiB each)",
                figures.first.as_secs_f64() * 1e3,
                figures.first.as_secs_f64() * 1e6 / f64::from(count),
                figures.replace.as_secs_f64() * 1e3,
                figures.rss_kib as f64 / 1024.0,
                figures.rss_kib as f64 / f64::from(count)
            );
        }
        println!(
            "  {count:>3} instances, pooling against on-demand: first {:.2}x the time, replace \
             {:.2}x, RSS {:.2}x",
            pooling.first.as_secs_f64() / on_demand.first.as_secs_f64(),
            pooling.replace.as_secs_f64() / on_demand.replace.as_secs_f64(),
            pooling.rss_kib as f64 / on_demand.rss_kib.max(1) as f64
        );
    }
}
