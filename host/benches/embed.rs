//! Throughput of the in-process MiniLM embedder: batches of 32 short texts (~20 words, like a
//! row's title and summary) with 1 and 2 pool threads. Run with `cargo bench -p pgstream-host
//! --bench embed`; criterion reports elements/s, i.e. texts embedded per second. Skipped with a
//! message when the model is not installed.

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use pgstream_host::embed::{Embedder, MiniLmEmbedder, MiniLmOptions, default_model_dir};

const BATCH: usize = 32;

/// Distinct ~20-word texts, so no two rows of a batch are identical.
fn short_texts() -> Vec<String> {
    (0..BATCH)
        .map(|i| {
            format!(
                "Order {i} shipped from warehouse {} to customer {} with {} items, tracking \
                 number pending, expected delivery next week.",
                i % 7,
                i * 13 + 5,
                i % 5 + 1
            )
        })
        .collect()
}

fn embed_short_batches(c: &mut Criterion) {
    let Some(dir) = default_model_dir().filter(|dir| dir.join("model.safetensors").is_file())
    else {
        eprintln!("SKIPPED: MiniLM model not found (PGSTREAM_MODEL_DIR or .cache/venv)");
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let texts = short_texts();

    let mut group = c.benchmark_group("minilm_batch32_short");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(10));
    for threads in [1, 2] {
        let options = MiniLmOptions {
            threads,
            max_batch: BATCH,
        };
        let embedder = MiniLmEmbedder::load(&dir, options).expect("model loads");
        group.bench_with_input(BenchmarkId::new("threads", threads), &texts, |b, texts| {
            b.iter(|| runtime.block_on(embedder.embed(texts)).expect("embeds"));
        });
    }
    group.finish();
}

criterion_group!(benches, embed_short_batches);
criterion_main!(benches);
