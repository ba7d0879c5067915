//! The on-disk embedding cache (`CachingEmbedder`) in front of a counting embedder: a real
//! `Embedder` that computes deterministic vectors from the text and records every call, so each
//! test can check both what came back and what reached the model.
//!
//! Covered: hits after a reopen, only misses sent (in one call, each distinct text once), input
//! order kept, the size bound and LRU eviction, a model or dimension change missing, and every
//! way a cache file can be unusable (garbage, damaged pages, another format version, a foreign
//! redb file, a vector of the wrong length, locked by another handle) being reported and
//! ignored while embedding still works.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use pgstream_host::embed::{
    CachingEmbedder, EmbedCacheError, EmbedCacheOptions, EmbedError, Embedder,
};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use sha2::{Digest, Sha256};

/// An embedder that derives each vector from the SHA-256 of its text and counts its calls.
struct CountingEmbedder {
    model: String,
    dimensions: usize,
    calls: AtomicUsize,
    texts: AtomicUsize,
    batches: Mutex<Vec<Vec<String>>>,
    /// Whether calls fail, as a model server that is down does.
    failing: AtomicBool,
}

impl CountingEmbedder {
    fn new(model: &str, dimensions: usize) -> Arc<CountingEmbedder> {
        Arc::new(CountingEmbedder {
            model: model.to_owned(),
            dimensions,
            calls: AtomicUsize::new(0),
            texts: AtomicUsize::new(0),
            batches: Mutex::new(Vec::new()),
            failing: AtomicBool::new(false),
        })
    }

    fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn texts(&self) -> usize {
        self.texts.load(Ordering::SeqCst)
    }

    fn batches(&self) -> Vec<Vec<String>> {
        self.batches.lock().unwrap().clone()
    }
}

/// The vector `CountingEmbedder` gives `text`, with `dimensions` floats.
fn expected_vector(model: &str, text: &str, dimensions: usize) -> Vec<f32> {
    let digest = Sha256::digest(format!("{model}\n{text}").as_bytes());
    (0..dimensions)
        .map(|i| f32::from(digest[i % 32]) / 255.0 + i as f32)
        .collect()
}

#[async_trait]
impl Embedder for CountingEmbedder {
    fn model_id(&self) -> &str {
        &self.model
    }

    fn dimensions(&self) -> usize {
        self.dimensions
    }

    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(EmbedError::Unavailable {
                endpoint: "counting-model".into(),
                attempts: 1,
                reason: "told to fail".into(),
                source: None,
            });
        }
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.texts.fetch_add(texts.len(), Ordering::SeqCst);
        self.batches.lock().unwrap().push(texts.to_vec());
        Ok(texts
            .iter()
            .map(|text| expected_vector(&self.model, text, self.dimensions))
            .collect())
    }
}

const MODEL: &str = "counting-model";
const DIMS: usize = 8;

fn options(path: &Path, max_bytes: u64) -> EmbedCacheOptions {
    EmbedCacheOptions {
        path: path.to_owned(),
        max_bytes,
    }
}

fn texts(items: &[&str]) -> Vec<String> {
    items.iter().map(|item| item.to_string()).collect()
}

fn expected(model: &str, items: &[String], dimensions: usize) -> Vec<Vec<f32>> {
    items
        .iter()
        .map(|text| expected_vector(model, text, dimensions))
        .collect()
}

fn open(inner: &Arc<CountingEmbedder>, path: &Path) -> CachingEmbedder {
    let cache = CachingEmbedder::try_open(inner.clone(), &options(path, 64 << 20))
        .expect("the cache opens");
    assert!(cache.is_active());
    cache
}

/// Collects what the code under test logs, so a test can check the warning an operator sees.
#[derive(Clone, Default)]
struct LogCapture(Arc<Mutex<Vec<u8>>>);

impl LogCapture {
    /// Captures this thread's log events until the guard is dropped.
    fn start() -> (LogCapture, tracing::subscriber::DefaultGuard) {
        let capture = LogCapture::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(capture.clone())
            .with_ansi(false)
            .finish();
        let guard = tracing::subscriber::set_default(subscriber);
        (capture, guard)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for LogCapture {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogCapture {
    type Writer = LogCapture;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

fn cache_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("nested/embed-cache.redb")
}

#[tokio::test]
async fn vectors_are_read_back_after_a_reopen_without_calling_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let path = cache_path(&dir);
    let batch = texts(&["alpha", "beta", "gamma"]);
    {
        let model = CountingEmbedder::new(MODEL, DIMS);
        let cache = open(&model, &path);
        assert_eq!(
            cache.embed(&batch).await.unwrap(),
            expected(MODEL, &batch, DIMS)
        );
        assert_eq!((model.calls(), model.texts()), (1, 3));
    }

    let model = CountingEmbedder::new(MODEL, DIMS);
    let cache = open(&model, &path);
    assert_eq!(
        cache.embed(&batch).await.unwrap(),
        expected(MODEL, &batch, DIMS)
    );
    assert_eq!(model.calls(), 0, "every text was cached before the reopen");
    let stats = cache.stats();
    assert_eq!((stats.hits, stats.misses), (3, 0));
    assert_eq!((stats.texts_embedded, stats.model_requests), (0, 0));
    assert_eq!(stats.hit_rate(), 1.0);
    assert_eq!(cache.cache_stats(), Some(stats));
}

#[tokio::test]
async fn only_misses_reach_the_model_in_one_call_and_order_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let model = CountingEmbedder::new(MODEL, DIMS);
    let cache = open(&model, &cache_path(&dir));
    cache.embed(&texts(&["one", "two", "three"])).await.unwrap();

    let mixed = texts(&["four", "two", "five", "one", "six", "three"]);
    let vectors = cache.embed(&mixed).await.unwrap();
    assert_eq!(vectors, expected(MODEL, &mixed, DIMS));
    assert_eq!(
        model.batches().last().unwrap(),
        &texts(&["four", "five", "six"]),
        "the second call carries only the new texts, in their input order"
    );
    assert_eq!(model.calls(), 2);
    let stats = cache.stats();
    assert_eq!((stats.hits, stats.misses), (3, 6));
    assert_eq!((stats.texts_embedded, stats.model_requests), (6, 2));
}

#[tokio::test]
async fn a_text_repeated_in_a_batch_is_embedded_once() {
    let dir = tempfile::tempdir().unwrap();
    let model = CountingEmbedder::new(MODEL, DIMS);
    let cache = open(&model, &cache_path(&dir));
    let batch = texts(&["same", "other", "same", "same", "other", ""]);
    assert_eq!(
        cache.embed(&batch).await.unwrap(),
        expected(MODEL, &batch, DIMS)
    );
    assert_eq!(model.batches(), vec![texts(&["same", "other", ""])]);

    // Repeated hits come back too, each in its place.
    let again = texts(&["other", "same", "other", "new", "new"]);
    assert_eq!(
        cache.embed(&again).await.unwrap(),
        expected(MODEL, &again, DIMS)
    );
    assert_eq!(model.batches().last().unwrap(), &texts(&["new"]));
    let stats = cache.stats();
    assert_eq!((stats.hits, stats.misses), (3, 8));
    assert_eq!(stats.texts_embedded, 4);
}

#[tokio::test]
async fn an_empty_batch_neither_calls_the_model_nor_counts() {
    let dir = tempfile::tempdir().unwrap();
    let model = CountingEmbedder::new(MODEL, DIMS);
    let cache = open(&model, &cache_path(&dir));
    assert!(cache.embed(&[]).await.unwrap().is_empty());
    assert_eq!(model.calls(), 0);
    assert_eq!(cache.stats(), Default::default());
}

#[tokio::test]
async fn another_model_or_dimension_count_misses() {
    let dir = tempfile::tempdir().unwrap();
    let path = cache_path(&dir);
    let batch = texts(&["shared text", "another"]);
    {
        let model = CountingEmbedder::new(MODEL, DIMS);
        open(&model, &path).embed(&batch).await.unwrap();
    }
    {
        let other = CountingEmbedder::new("other-model", DIMS);
        let cache = open(&other, &path);
        assert_eq!(
            cache.embed(&batch).await.unwrap(),
            expected("other-model", &batch, DIMS)
        );
        assert_eq!(
            other.texts(),
            2,
            "another model id must not read these vectors"
        );
    }
    {
        let wider = CountingEmbedder::new(MODEL, DIMS * 2);
        let cache = open(&wider, &path);
        assert_eq!(
            cache.embed(&batch).await.unwrap(),
            expected(MODEL, &batch, DIMS * 2)
        );
        assert_eq!(
            wider.texts(),
            2,
            "another vector size must not read these vectors"
        );
    }
    // The first model's entries are still there.
    let model = CountingEmbedder::new(MODEL, DIMS);
    open(&model, &path).embed(&batch).await.unwrap();
    assert_eq!(model.calls(), 0);
}

#[tokio::test]
async fn texts_that_differ_only_in_whitespace_or_case_are_different_keys() {
    let dir = tempfile::tempdir().unwrap();
    let model = CountingEmbedder::new(MODEL, DIMS);
    let cache = open(&model, &cache_path(&dir));
    cache.embed(&texts(&["Text"])).await.unwrap();
    let variants = texts(&["text", "Text ", " Text", "Text\n"]);
    assert_eq!(
        cache.embed(&variants).await.unwrap(),
        expected(MODEL, &variants, DIMS)
    );
    assert_eq!(model.texts(), 5);
}

/// The bound holds for the file itself: filling a 4 MiB cache with 384-float vectors (what
/// MiniLM produces) to several times its capacity, in batches of 100 and then of 1000, evicts,
/// keeps the file under the limit after every batch, keeps the most recent entries, and keeps
/// an entry that is hit often over older ones.
#[tokio::test]
async fn the_cache_stays_under_its_size_limit_and_evicts_least_recently_used() {
    const MINILM_DIMS: usize = 384;
    const LIMIT: u64 = 4 << 20;
    let dir = tempfile::tempdir().unwrap();
    let path = cache_path(&dir);
    let model = CountingEmbedder::new(MODEL, MINILM_DIMS);
    let cache_options = options(&path, LIMIT);
    let capacity = cache_options.capacity(MINILM_DIMS) as usize;
    assert!(
        capacity > 500,
        "a 4 MiB cache keeps only {capacity} vectors"
    );
    let cache = CachingEmbedder::try_open(model.clone(), &cache_options).unwrap();

    let hot = texts(&["kept hot by hits"]);
    cache.embed(&hot).await.unwrap();
    let mut written = Vec::new();
    let batch_sizes = std::iter::repeat_n(100, capacity * 3 / 100).chain([1000, 1000, 1000]);
    for (round, size) in batch_sizes.enumerate() {
        let batch: Vec<String> = (0..size).map(|i| format!("text {round}-{i}")).collect();
        cache.embed(&batch).await.unwrap();
        // A hit every round keeps this entry among the most recently used.
        cache.embed(&hot).await.unwrap();
        written.extend(batch);
        let file = std::fs::metadata(&path).unwrap().len();
        assert!(
            file <= LIMIT,
            "after round {round} the file is {file} bytes, over the {LIMIT}-byte limit"
        );
    }
    let stats = cache.stats();
    assert!(
        stats.evictions as usize >= written.len() - capacity,
        "{} entries written into room for {capacity}, but only {} evicted",
        written.len(),
        stats.evictions
    );
    drop(cache);

    let model = CountingEmbedder::new(MODEL, MINILM_DIMS);
    let cache = CachingEmbedder::try_open(model.clone(), &cache_options).unwrap();
    cache.embed(&hot).await.unwrap();
    assert_eq!(model.calls(), 0, "the entry hit every round was evicted");
    let newest = &written[written.len() - 100..];
    cache.embed(newest).await.unwrap();
    assert_eq!(model.calls(), 0, "the newest entries were evicted");
    let oldest = &written[..100];
    cache.embed(oldest).await.unwrap();
    assert_eq!(model.texts(), 100, "the oldest entries were kept");
}

/// A hit in a call whose misses the model then failed on was still a use: the entry stays
/// among the most recently used, as in the test above, though no call it was part of succeeded.
#[tokio::test]
async fn a_hit_in_a_call_the_model_fails_still_counts_as_a_recent_use() {
    const MINILM_DIMS: usize = 384;
    const LIMIT: u64 = 4 << 20;
    let dir = tempfile::tempdir().unwrap();
    let path = cache_path(&dir);
    let model = CountingEmbedder::new(MODEL, MINILM_DIMS);
    let cache_options = options(&path, LIMIT);
    let capacity = cache_options.capacity(MINILM_DIMS) as usize;
    let cache = CachingEmbedder::try_open(model.clone(), &cache_options).unwrap();

    let hot = "used only in calls that fail".to_owned();
    cache.embed(std::slice::from_ref(&hot)).await.unwrap();
    for round in 0..capacity * 3 / 100 {
        let batch: Vec<String> = (0..100).map(|i| format!("text {round}-{i}")).collect();
        cache.embed(&batch).await.unwrap();
        model.set_failing(true);
        let with_a_miss = [hot.clone(), format!("never embedded {round}")];
        assert!(cache.embed(&with_a_miss).await.is_err());
        model.set_failing(false);
    }
    drop(cache);

    let model = CountingEmbedder::new(MODEL, MINILM_DIMS);
    let cache = CachingEmbedder::try_open(model.clone(), &cache_options).unwrap();
    cache.embed(&[hot]).await.unwrap();
    assert_eq!(
        model.calls(),
        0,
        "the entry used in every round was evicted"
    );
}

#[tokio::test]
async fn a_garbage_file_is_reported_and_embedding_still_works() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("not-a-cache");
    let garbage: Vec<u8> = (0..100_000u32).map(|i| (i * 7919 % 251) as u8).collect();
    std::fs::write(&path, &garbage).unwrap();

    let model = CountingEmbedder::new(MODEL, DIMS);
    let (log, _guard) = LogCapture::start();
    let cache = CachingEmbedder::open(model.clone(), &options(&path, 64 << 20));
    assert!(!cache.is_active());
    let log = log.text();
    assert!(
        log.contains("WARN") && log.contains("cannot open embedding cache"),
        "no warning about the unusable cache in: {log}"
    );
    assert!(log.contains("running without the embedding cache"), "{log}");

    let batch = texts(&["still", "works", "still"]);
    assert_eq!(
        cache.embed(&batch).await.unwrap(),
        expected(MODEL, &batch, DIMS)
    );
    assert_eq!(
        model.texts(),
        3,
        "without a cache every text goes to the model"
    );
    assert_eq!(cache.stats().misses, 3);
    assert_eq!(
        std::fs::read(&path).unwrap(),
        garbage,
        "the bad file was modified"
    );
}

/// A file whose header is intact but whose pages were overwritten: whatever redb makes of it
/// (an error at open, at a lookup, or a panic inside it), embedding gives the right vectors.
#[tokio::test]
async fn a_cache_with_damaged_pages_never_breaks_embedding() {
    let dir = tempfile::tempdir().unwrap();
    let path = cache_path(&dir);
    let batch: Vec<String> = (0..500).map(|i| format!("document {i}")).collect();
    {
        let model = CountingEmbedder::new(MODEL, 384);
        open(&model, &path).embed(&batch).await.unwrap();
    }
    let mut bytes = std::fs::read(&path).unwrap();
    // Keep the first 4 KiB (redb's header page); scribble over the rest.
    for (i, byte) in bytes.iter_mut().enumerate().skip(4096) {
        *byte = (i * 31 % 256) as u8;
    }
    std::fs::write(&path, &bytes).unwrap();

    let model = CountingEmbedder::new(MODEL, 384);
    let cache = CachingEmbedder::open(model.clone(), &options(&path, 64 << 20));
    assert_eq!(
        cache.embed(&batch).await.unwrap(),
        expected(MODEL, &batch, 384)
    );
    assert_eq!(
        cache.embed(&batch).await.unwrap(),
        expected(MODEL, &batch, 384)
    );
}

#[tokio::test]
async fn a_cache_open_elsewhere_is_reported_and_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let path = cache_path(&dir);
    let first_model = CountingEmbedder::new(MODEL, DIMS);
    let first = open(&first_model, &path);
    first.embed(&texts(&["cached"])).await.unwrap();

    match CachingEmbedder::try_open(CountingEmbedder::new(MODEL, DIMS), &options(&path, 1 << 20)) {
        Err(EmbedCacheError::Locked { path: locked }) => assert_eq!(locked, path),
        Err(other) => panic!("expected a lock error, got {other}"),
        Ok(_) => panic!("a second handle opened a cache that is in use"),
    }
    let model = CountingEmbedder::new(MODEL, DIMS);
    let (log, _guard) = LogCapture::start();
    let second = CachingEmbedder::open(model.clone(), &options(&path, 1 << 20));
    assert!(!second.is_active());
    assert!(
        log.text().contains("in use by another process"),
        "{}",
        log.text()
    );
    let batch = texts(&["cached", "fresh"]);
    assert_eq!(
        second.embed(&batch).await.unwrap(),
        expected(MODEL, &batch, DIMS)
    );
    assert_eq!(model.texts(), 2);

    // The first handle is unaffected.
    assert_eq!(
        first.embed(&batch).await.unwrap(),
        expected(MODEL, &batch, DIMS)
    );
    assert_eq!(first_model.batches().last().unwrap(), &texts(&["fresh"]));
}

const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("entries");
const INDEX: TableDefinition<&[u8; 32], u64> = TableDefinition::new("index");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// The key as documented in `host/src/embed/cache.rs`.
fn documented_key(model: &str, dimensions: usize, text: &str) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update((model.len() as u64).to_le_bytes());
    hasher.update(model.as_bytes());
    hasher.update((dimensions as u64).to_le_bytes());
    hasher.update(text.as_bytes());
    hasher.finalize().into()
}

#[tokio::test]
async fn entries_follow_the_documented_key_and_a_wrong_length_vector_is_a_miss() {
    let dir = tempfile::tempdir().unwrap();
    let path = cache_path(&dir);
    let batch = texts(&["short", "intact"]);
    {
        let model = CountingEmbedder::new(MODEL, DIMS);
        open(&model, &path).embed(&batch).await.unwrap();
    }
    {
        let db = redb::Database::open(&path).unwrap();
        let write = db.begin_write().unwrap();
        {
            let index = write.open_table(INDEX).unwrap();
            let mut entries = write.open_table(ENTRIES).unwrap();
            let key = documented_key(MODEL, DIMS, "intact");
            let sequence = index.get(&key).unwrap().expect("documented key").value();
            let stored = entries.get(sequence).unwrap().unwrap().value().to_vec();
            assert_eq!(stored[..32], key, "an entry starts with its key");
            let floats: Vec<f32> = stored[32..]
                .chunks_exact(4)
                .map(|chunk| f32::from_le_bytes(chunk.try_into().unwrap()))
                .collect();
            assert_eq!(
                floats,
                expected_vector(MODEL, "intact", DIMS),
                "f32 little-endian"
            );
            let short_key = documented_key(MODEL, DIMS, "short");
            let short = index
                .get(&short_key)
                .unwrap()
                .expect("documented key")
                .value();
            let mut truncated = short_key.to_vec();
            truncated.extend_from_slice(&[0u8; 12]);
            entries.insert(short, truncated.as_slice()).unwrap();
        }
        write.commit().unwrap();
    }
    let model = CountingEmbedder::new(MODEL, DIMS);
    let cache = open(&model, &path);
    assert_eq!(
        cache.embed(&batch).await.unwrap(),
        expected(MODEL, &batch, DIMS)
    );
    assert_eq!(model.batches(), vec![texts(&["short"])]);
    // The miss was stored again with the right length.
    cache.embed(&batch).await.unwrap();
    assert_eq!(model.calls(), 1);
}

#[tokio::test]
async fn another_format_version_is_reported_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = cache_path(&dir);
    {
        let model = CountingEmbedder::new(MODEL, DIMS);
        open(&model, &path).embed(&texts(&["x"])).await.unwrap();
    }
    {
        let db = redb::Database::open(&path).unwrap();
        let write = db.begin_write().unwrap();
        write
            .open_table(META)
            .unwrap()
            .insert("format_version", 99)
            .unwrap();
        write.commit().unwrap();
    }
    match CachingEmbedder::try_open(CountingEmbedder::new(MODEL, DIMS), &options(&path, 1 << 20)) {
        Err(EmbedCacheError::FormatVersion { found: 99, .. }) => {}
        Err(other) => panic!("expected a format version error, got {other}"),
        Ok(_) => panic!("a cache of another format version was used"),
    }
    let model = CountingEmbedder::new(MODEL, DIMS);
    let cache = CachingEmbedder::open(model.clone(), &options(&path, 1 << 20));
    assert!(!cache.is_active());
    cache.embed(&texts(&["x"])).await.unwrap();
    assert_eq!(model.texts(), 1);
    let db = redb::Database::open(&path).unwrap();
    let read = db.begin_read().unwrap();
    let meta = read.open_table(META).unwrap();
    assert_eq!(meta.get("format_version").unwrap().unwrap().value(), 99);
}

#[tokio::test]
async fn a_redb_file_of_another_program_is_not_touched() {
    const OTHER: TableDefinition<&str, &str> = TableDefinition::new("settings");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.redb");
    {
        let db = redb::Database::create(&path).unwrap();
        let write = db.begin_write().unwrap();
        write
            .open_table(OTHER)
            .unwrap()
            .insert("theme", "dark")
            .unwrap();
        write.commit().unwrap();
    }
    match CachingEmbedder::try_open(CountingEmbedder::new(MODEL, DIMS), &options(&path, 1 << 20)) {
        Err(EmbedCacheError::NotACache { .. }) => {}
        Err(other) => panic!("expected a not-a-cache error, got {other}"),
        Ok(_) => panic!("a foreign redb file was used as a cache"),
    }
    let db = redb::Database::open(&path).unwrap();
    let read = db.begin_read().unwrap();
    assert!(
        read.open_table(ENTRIES).is_err(),
        "cache tables were added to a foreign file"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_cache_serves_concurrent_callers() {
    let dir = tempfile::tempdir().unwrap();
    let model = CountingEmbedder::new(MODEL, DIMS);
    let cache = Arc::new(open(&model, &cache_path(&dir)));
    let mut tasks = Vec::new();
    for task in 0..8 {
        let cache = cache.clone();
        tasks.push(tokio::spawn(async move {
            for round in 0..20 {
                // Half of each batch is shared by all tasks, half is the task's own.
                let batch: Vec<String> = (0..10)
                    .map(|i| {
                        if i % 2 == 0 {
                            format!("shared {round}-{i}")
                        } else {
                            format!("task {task} {round}-{i}")
                        }
                    })
                    .collect();
                let vectors = cache.embed(&batch).await.unwrap();
                assert_eq!(vectors, expected(MODEL, &batch, DIMS));
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let stats = cache.stats();
    assert_eq!(stats.hits + stats.misses, 8 * 20 * 10);
    // Own texts are always misses; a shared one is embedded at most once per task.
    assert!(stats.texts_embedded >= 8 * 20 * 5 + 20 * 5);
    assert!(cache.is_active());

    // Everything ends up stored once: a fresh handle finds all of it.
    assert_eq!(Arc::strong_count(&cache), 1);
    drop(cache);
    let model = CountingEmbedder::new(MODEL, DIMS);
    let reopened = open(&model, &cache_path(&dir));
    let all: Vec<String> = (0..20)
        .flat_map(|round| {
            (0..10)
                .step_by(2)
                .map(move |i| format!("shared {round}-{i}"))
        })
        .collect();
    reopened.embed(&all).await.unwrap();
    assert_eq!(model.calls(), 0);
}
