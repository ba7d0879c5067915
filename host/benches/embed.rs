//! Throughput of the in-process MiniLM embedder against sentence-transformers, on the same
//! texts, in the same run.
//!
//! The texts are 2,000 rows of 10 to 60 words (seeded, so every run embeds the same ones), the
//! mixed lengths a real table has. The host's embedder encodes them in one call, as the
//! pipeline hands it a batch; then, if the bench-only virtualenv `.cache/bench-venv` exists
//! (`make bench` installs torch and sentence-transformers there), `embed_reference.py` encodes
//! the same texts with `SentenceTransformer` on the CPU with the same thread count and batch
//! size 64; then the host runs once more, so a neighbour that disturbed one side shows as two
//! host rounds that disagree. The bench prints texts/s for each and the ratio of the best
//! rounds.
//!
//! Run with `cargo bench -p pgstream-host --bench embed`. `PGSTREAM_BENCH_THREADS` sets the
//! thread count of both sides (default: all cores), `PGSTREAM_BENCH_MAX_BATCH` a comma-separated
//! list of host micro-batch sizes to compare (default: the host's default), and
//! `PGSTREAM_BENCH_TEXTS` the number of texts. Skipped with a message when the model is not
//! installed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use pgstream_host::embed::{Embedder, MiniLmEmbedder, MiniLmOptions, default_model_dir};

/// Texts per run unless `PGSTREAM_BENCH_TEXTS` says otherwise.
const DEFAULT_TEXTS: usize = 2_000;
/// sentence-transformers' batch size: the one a user would pick for a bulk encode.
const REFERENCE_BATCH: usize = 64;
/// Timed rounds of the Python side; the best one counts.
const REFERENCE_ROUNDS: usize = 2;

/// Words the texts are drawn from: plain English of the kind product and support rows hold.
const WORDS: &str = "order shipped customer warehouse delivery invoice refund the a to \
     of and with for on was \
     is not late damaged package tracking number support ticket account password reset email \
     phone battery screen cable charger laptop keyboard mouse monitor printer paper ink \
     replacement warranty return policy store online price discount coupon subscription \
     monthly annual plan upgrade cancel billing address changed moved city street week \
     yesterday today quickly slowly never always again broken works great terrible happy angry \
     asked answered manager team product quality size colour blue red large small heavy light \
     fast software update install error crash login page button missing found because";

/// `count` distinct texts of 10 to 60 words, the same for every run.
fn mixed_texts(count: usize) -> Vec<String> {
    let words: Vec<&str> = WORDS.split_whitespace().collect();
    let mut rng = fastrand::Rng::with_seed(11);
    (0..count)
        .map(|row| {
            let length = rng.usize(10..=60);
            let mut text = format!("Row {row}:");
            for _ in 0..length {
                text.push(' ');
                text.push_str(words[rng.usize(..words.len())]);
            }
            text.push('.');
            text
        })
        .collect()
}

fn env_usize(name: &str) -> Result<Option<usize>> {
    match std::env::var(name) {
        Ok(value) => Ok(Some(
            value.parse().with_context(|| format!("{name}={value}"))?,
        )),
        Err(_) => Ok(None),
    }
}

/// Texts per second of one call that embeds every text.
fn host_round(
    runtime: &tokio::runtime::Runtime,
    embedder: &MiniLmEmbedder,
    texts: &[String],
) -> Result<f64> {
    let start = Instant::now();
    let vectors = runtime.block_on(embedder.embed(texts))?;
    let elapsed = start.elapsed();
    if vectors.len() != texts.len() {
        bail!("{} vectors for {} texts", vectors.len(), texts.len());
    }
    Ok(texts.len() as f64 / elapsed.as_secs_f64())
}

/// The bench-only Python, if `make bench` has installed it.
fn reference_python() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = root.join(".cache/bench-venv/bin/python");
    python.is_file().then_some(python)
}

/// The best texts/s of sentence-transformers over `REFERENCE_ROUNDS`, on the same texts.
fn reference_rate(python: &Path, dir: &Path, texts: &[String], threads: usize) -> Result<f64> {
    let scratch = tempfile::tempdir()?;
    let texts_path = scratch.path().join("texts.json");
    std::fs::write(&texts_path, serde_json::to_vec(texts)?)?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/embed_reference.py");
    let output = Command::new(python)
        .arg(script)
        .arg(&texts_path)
        .arg(dir)
        .arg(threads.to_string())
        .arg(REFERENCE_BATCH.to_string())
        .arg(REFERENCE_ROUNDS.to_string())
        // torch's own OpenMP pool follows these as well as `set_num_threads`.
        .env("OMP_NUM_THREADS", threads.to_string())
        .env("MKL_NUM_THREADS", threads.to_string())
        .output()
        .context("running embed_reference.py")?;
    if !output.status.success() {
        bail!(
            "embed_reference.py failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)
        .with_context(|| String::from_utf8_lossy(&output.stdout).into_owned())?;
    let rates: Vec<f64> = report["rates"]
        .as_array()
        .context("no rates in the report")?
        .iter()
        .filter_map(serde_json::Value::as_f64)
        .collect();
    for rate in &rates {
        println!("  sentence-transformers round: {rate:.1} texts/s");
    }
    println!(
        "  (torch {}, {} threads)",
        report["torch"].as_str().unwrap_or("?"),
        report["threads"]
    );
    rates
        .into_iter()
        .reduce(f64::max)
        .context("no timed rounds")
}

fn main() -> Result<()> {
    let Some(dir) = default_model_dir().filter(|dir| dir.join("model.safetensors").is_file())
    else {
        eprintln!("SKIPPED: MiniLM model not found (PGSTREAM_MODEL_DIR or .cache/venv)");
        return Ok(());
    };
    let defaults = MiniLmOptions::default();
    let threads = env_usize("PGSTREAM_BENCH_THREADS")?.unwrap_or(defaults.threads);
    let texts = mixed_texts(env_usize("PGSTREAM_BENCH_TEXTS")?.unwrap_or(DEFAULT_TEXTS));
    let max_batches: Vec<usize> = match std::env::var("PGSTREAM_BENCH_MAX_BATCH") {
        Ok(list) => list
            .split(',')
            .map(|size| {
                size.trim()
                    .parse()
                    .with_context(|| format!("max batch {size}"))
            })
            .collect::<Result<_>>()?,
        Err(_) => vec![defaults.max_batch],
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;

    println!(
        "all-MiniLM-L6-v2 on {} texts of 10 to 60 words, {threads} threads",
        texts.len()
    );
    let mut embedders = Vec::new();
    for &max_batch in &max_batches {
        let embedder = MiniLmEmbedder::load(&dir, MiniLmOptions { threads, max_batch })?;
        // One short call first, so neither side is timed paging the weights in.
        runtime.block_on(embedder.embed(&texts[..64.min(texts.len())]))?;
        embedders.push((max_batch, embedder));
    }
    let mut host_best = vec![0f64; embedders.len()];
    let mut host_pass = |label: &str| -> Result<()> {
        for ((max_batch, embedder), best) in embedders.iter().zip(host_best.iter_mut()) {
            let rate = host_round(&runtime, embedder, &texts)?;
            println!("  host ({label}), micro-batches of {max_batch}: {rate:.1} texts/s");
            *best = best.max(rate);
        }
        Ok(())
    };
    host_pass("before")?;
    let reference = match reference_python() {
        Some(python) => Some(reference_rate(&python, &dir, &texts, threads)?),
        None => {
            println!(
                "  sentence-transformers: SKIPPED (no .cache/bench-venv; `make bench` installs it)"
            );
            None
        }
    };
    host_pass("after")?;

    for ((max_batch, _), best) in embedders.iter().zip(&host_best) {
        match reference {
            Some(reference) => println!(
                "host (micro-batches of {max_batch}) {best:.1} texts/s, sentence-transformers \
                 {reference:.1} texts/s: {:.2}x",
                best / reference
            ),
            None => println!("host (micro-batches of {max_batch}) {best:.1} texts/s"),
        }
    }
    Ok(())
}
