//! An on-disk embedding cache: [`CachingEmbedder`] wraps any [`Embedder`] and remembers every
//! vector it returned, so text that was embedded once is never sent to the model again.
//!
//! Why: delivery is at least once, so a crash replays every change the host had not confirmed,
//! and a re-run or an UPDATE that leaves the embedded column alone asks for the same vectors
//! again. With the cache those cost a disk read instead of model time or API money.
//!
//! # Keys
//!
//! An entry is keyed by the SHA-256 of
//!
//! ```text
//! u64-LE byte length of model_id || model_id (UTF-8) || u64-LE dimensions || text (UTF-8)
//! ```
//!
//! The model id is length-prefixed and the dimension count fixed-width, so no two
//! (model, dimensions, text) triples encode to the same bytes: a different model, or the same
//! model asked for another vector size, never reads another's vectors, and the text is compared
//! exactly (no normalisation, no trimming). The value is the vector as `dimensions` f32s in
//! little-endian order; one of another length read back is treated as a miss.
//!
//! # Storage
//!
//! One [redb](https://docs.rs/redb) file: a crash-safe, copy-on-write B-tree store. Tables:
//! `entries` (use sequence number -> key followed by the vector), `index` (key -> sequence
//! number) and `meta` (format version, next sequence number, bytes charged). `entries` is in
//! least-recently-used order, so eviction pops from its front, and new entries append at its
//! end, which keeps its pages full (redb packs ascending inserts; random keys would leave
//! leaves of 1.5 KiB vectors half empty).
//!
//! Bound: the limit is on the file. Each entry is charged its bytes plus `ENTRY_OVERHEAD` (its
//! index row and page slack, measured), and the entries may be charged `FILE_SHARE` of the limit
//! (less `FILE_BASE`), because redb grows the file by doubling it and keeps the pages a commit
//! replaced until the next commit. When a commit takes the charge over that budget, the least
//! recently used entries are evicted in one go down to `LOW_WATER` of it, so eviction runs once
//! per many inserts. Measured: files stay at or under the limit at limits just below a growth
//! step, the worst case; a 1024 MiB limit keeps about 190,000 384-dimension vectors
//! ([`EmbedCacheOptions::capacity`]).
//!
//! Recency: a hit does not write at once; its key is queued and the queue is written with the
//! next insert, or on its own when it holds `TOUCH_FLUSH` keys. A crash loses only that
//! recency information, never a vector.
//!
//! # Failures are never fatal
//!
//! A cache that cannot be opened (locked by another process, not a cache, another format
//! version, corrupt, no permission) is reported once as a warning and the embedder runs without
//! it; the file is left untouched so nothing the operator may want to inspect is destroyed
//! (delete it to start a fresh cache). A read or write that fails later, including a panic
//! inside the store on a damaged file, also switches the cache off with one warning; the batch
//! in progress is still embedded by the model. Only the wrapped embedder's own errors are
//! returned.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use super::{EmbedError, Embedder};

/// Version of the table layout and key encoding; a file written with another one is refused.
const FORMAT_VERSION: u64 = 1;

/// Bytes charged per entry beyond its key and vector: its `index` row, its sequence number and
/// the slack of the pages (two 384-float entries fill 77% of a 4 KiB page). Measured by filling
/// caches with 384-dimension vectors and comparing the file size with the entry count;
/// `host/tests/embed_cache.rs` checks that the file stays under the limit.
const ENTRY_OVERHEAD: u64 = 640;

/// Share of the size limit the entries may be charged. redb grows its file by doubling it, and
/// copy-on-write keeps the pages a commit replaced until the next one, so the file must have
/// room for about twice the live data. Measured at limits just under a growth step, where the
/// margin is smallest, with batches of 100 and 1000 vectors.
const FILE_SHARE: f64 = 0.4;

/// Bytes of the file that hold no entries (redb's header, allocator state and table roots),
/// taken off the limit before [`FILE_SHARE`] applies.
const FILE_BASE: u64 = 512 * 1024;

/// After an eviction the entries are charged at most this fraction of the budget, so the next
/// eviction waits for many more inserts.
const LOW_WATER: f64 = 0.9;

/// Queued recency updates written on their own once this many pile up without an insert.
const TOUCH_FLUSH: usize = 4096;

/// Memory redb may keep for its page cache: enough for the B-tree interior and recent pages;
/// the OS page cache holds the rest. redb's own default (1 GiB) is far too much here.
const PAGE_CACHE_BYTES: usize = 32 * 1024 * 1024;

type Key = [u8; 32];

/// Entries in order of last use: sequence number -> key (32 bytes) followed by the vector.
const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("entries");
/// Key -> the sequence number its entry is stored under.
const INDEX: TableDefinition<&Key, u64> = TableDefinition::new("index");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

const META_FORMAT: &str = "format_version";
const META_NEXT_USE: &str = "next_use";
const META_BYTES: &str = "stored_bytes";

/// Where the cache lives and how large it may grow.
#[derive(Debug, Clone)]
pub struct EmbedCacheOptions {
    /// The cache file; created (with its folder) when missing.
    pub path: PathBuf,
    /// Upper bound on the size of the file; see [`EmbedCacheOptions::capacity`] for what fits.
    pub max_bytes: u64,
}

impl EmbedCacheOptions {
    /// About how many vectors of `dimensions` floats the cache keeps before it evicts.
    pub fn capacity(&self, dimensions: usize) -> u64 {
        budget(self.max_bytes) / entry_cost(32 + dimensions * 4)
    }
}

/// Bytes the entries may be charged under a limit of `max_bytes` for the file.
fn budget(max_bytes: u64) -> u64 {
    (max_bytes.saturating_sub(FILE_BASE) as f64 * FILE_SHARE) as u64
}

/// Why the cache could not be used. Never returned by [`Embedder::embed`]: the caching embedder
/// logs it and carries on without the cache.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EmbedCacheError {
    /// Another process (or another handle in this one) has the file open.
    #[error(
        "embedding cache {} is in use by another process; each running host needs its own \
         --embed-cache file",
        path.display()
    )]
    Locked {
        /// The cache file.
        path: PathBuf,
    },
    /// The file is a redb database but holds something other than an embedding cache.
    #[error(
        "{} is not an embedding cache (it holds other tables); point --embed-cache at a new file",
        path.display()
    )]
    NotACache {
        /// The file.
        path: PathBuf,
    },
    /// The file is an embedding cache of another format version.
    #[error(
        "embedding cache {} has format version {found}, this host writes version \
         {FORMAT_VERSION}; delete the file to start a fresh cache",
        path.display()
    )]
    FormatVersion {
        /// The file.
        path: PathBuf,
        /// The version found in it.
        found: u64,
    },
    /// The file could not be opened or read as a cache (corrupt, not a redb file, permissions,
    /// I/O error).
    #[error(
        "cannot open embedding cache {} (delete the file to start a fresh cache)",
        path.display()
    )]
    Open {
        /// The file.
        path: PathBuf,
        /// What redb or the OS reported.
        #[source]
        source: redb::Error,
    },
    /// The store panicked while opening the file, which redb does on some damaged files.
    #[error(
        "embedding cache {} is damaged (the store failed while reading it); delete the file \
         to start a fresh cache",
        path.display()
    )]
    Damaged {
        /// The file.
        path: PathBuf,
    },
    /// A read or write on an open cache failed.
    #[error("embedding cache {} failed", path.display())]
    Storage {
        /// The file.
        path: PathBuf,
        /// What redb reported.
        #[source]
        source: redb::Error,
    },
    /// The worker thread running a cache operation panicked.
    #[error("embedding cache {} failed: its worker stopped", path.display())]
    Worker {
        /// The file.
        path: PathBuf,
        /// The panic, as a task error.
        #[source]
        source: tokio::task::JoinError,
    },
}

/// Counters of a [`CachingEmbedder`] since it was created, for the log summary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EmbedCacheStats {
    /// Texts whose vector came from the cache.
    pub hits: u64,
    /// Texts whose vector was not in the cache (a text repeated in one call counts each time,
    /// but is sent to the model once).
    pub misses: u64,
    /// Texts sent to the wrapped embedder.
    pub texts_embedded: u64,
    /// Calls made to the wrapped embedder.
    pub model_requests: u64,
    /// Entries removed to stay under the size limit.
    pub evictions: u64,
}

impl EmbedCacheStats {
    /// Fraction of texts served from the cache, 0 when nothing was asked.
    pub fn hit_rate(&self) -> f64 {
        let total = self.hits + self.misses;
        if total == 0 {
            0.0
        } else {
            self.hits as f64 / total as f64
        }
    }
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    texts_embedded: AtomicU64,
    model_requests: AtomicU64,
    evictions: AtomicU64,
}

/// An [`Embedder`] that answers from an on-disk cache and sends only the texts it has not seen
/// to the embedder it wraps. Share one (in an `Arc`) between all pipelines of a process: the
/// file can be open only once.
pub struct CachingEmbedder {
    inner: Arc<dyn Embedder>,
    /// `None` when the cache could not be opened.
    store: Option<Arc<CacheStore>>,
    /// Set after the first failure of an open store; the cache is skipped from then on.
    disabled: AtomicBool,
    /// Keys hit since the last write, waiting to be marked as recently used.
    pending_touches: Mutex<Vec<Key>>,
    /// SHA-256 state after the model identity, cloned per text.
    model_prefix: Sha256,
    counters: Counters,
}

impl CachingEmbedder {
    /// Wraps `inner` with the cache at `options.path`. Never fails: a cache that cannot be
    /// opened is logged as a warning and the returned embedder passes every call to `inner`
    /// (see [`CachingEmbedder::is_active`]). Opening may read the whole file when the last
    /// process using it crashed (redb's recovery), so call it off the async runtime.
    pub fn open(inner: Arc<dyn Embedder>, options: &EmbedCacheOptions) -> CachingEmbedder {
        match CachingEmbedder::try_open(inner.clone(), options) {
            Ok(embedder) => {
                info!(
                    path = %options.path.display(),
                    max_mb = options.max_bytes / (1024 * 1024),
                    capacity = options.capacity(embedder.dimensions()),
                    "embedding cache open"
                );
                embedder
            }
            Err(error) => {
                warn!(
                    "{}; running without the embedding cache",
                    crate::error_chain::one_line(&error)
                );
                CachingEmbedder::build(inner, None)
            }
        }
    }

    /// Like [`CachingEmbedder::open`], but returns the reason when the cache cannot be used.
    pub fn try_open(
        inner: Arc<dyn Embedder>,
        options: &EmbedCacheOptions,
    ) -> Result<CachingEmbedder, EmbedCacheError> {
        let store = CacheStore::open(&options.path, options.max_bytes)?;
        Ok(CachingEmbedder::build(inner, Some(Arc::new(store))))
    }

    fn build(inner: Arc<dyn Embedder>, store: Option<Arc<CacheStore>>) -> CachingEmbedder {
        let model_id = inner.model_id().as_bytes();
        let mut model_prefix = Sha256::new();
        model_prefix.update((model_id.len() as u64).to_le_bytes());
        model_prefix.update(model_id);
        model_prefix.update((inner.dimensions() as u64).to_le_bytes());
        CachingEmbedder {
            inner,
            store,
            disabled: AtomicBool::new(false),
            pending_touches: Mutex::new(Vec::new()),
            model_prefix,
            counters: Counters::default(),
        }
    }

    /// Whether lookups go to the cache: false when it could not be opened or failed since.
    pub fn is_active(&self) -> bool {
        self.active_store().is_some()
    }

    /// Counters since this embedder was created.
    pub fn stats(&self) -> EmbedCacheStats {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        EmbedCacheStats {
            hits: load(&self.counters.hits),
            misses: load(&self.counters.misses),
            texts_embedded: load(&self.counters.texts_embedded),
            model_requests: load(&self.counters.model_requests),
            evictions: load(&self.counters.evictions),
        }
    }

    fn active_store(&self) -> Option<&Arc<CacheStore>> {
        self.store
            .as_ref()
            .filter(|_| !self.disabled.load(Ordering::Relaxed))
    }

    /// Switches the cache off after a failure, warning only the first time.
    fn disable(&self, error: &EmbedCacheError) {
        if !self.disabled.swap(true, Ordering::Relaxed) {
            warn!(
                "{}; running without the embedding cache from now on",
                crate::error_chain::one_line(error)
            );
        }
    }

    fn key(&self, text: &str) -> Key {
        let mut hasher = self.model_prefix.clone();
        hasher.update(text.as_bytes());
        hasher.finalize().into()
    }

    /// Sends `texts` to the wrapped embedder and counts the call.
    async fn embed_with_model(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        self.counters.model_requests.fetch_add(1, Ordering::Relaxed);
        self.counters
            .texts_embedded
            .fetch_add(texts.len() as u64, Ordering::Relaxed);
        self.inner.embed(texts).await
    }

    /// Runs a store operation on the blocking pool: a lookup reads pages from disk and a commit
    /// waits for fsync, neither of which may stall the async thread the pipeline runs on.
    async fn run_blocking<T: Send + 'static>(
        &self,
        store: &Arc<CacheStore>,
        operation: impl FnOnce(&CacheStore) -> Result<T, EmbedCacheError> + Send + 'static,
    ) -> Result<T, EmbedCacheError> {
        let worker_store = store.clone();
        tokio::task::spawn_blocking(move || operation(&worker_store))
            .await
            .map_err(|source| EmbedCacheError::Worker {
                path: store.path.clone(),
                source,
            })?
    }

    fn take_touches(&self) -> Vec<Key> {
        std::mem::take(
            &mut *self
                .pending_touches
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        )
    }

    /// Keeps recency updates for a later commit.
    fn defer_touches(&self, touches: Vec<Key>) {
        self.pending_touches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(touches);
    }
}

#[async_trait]
impl Embedder for CachingEmbedder {
    fn model_id(&self) -> &str {
        self.inner.model_id()
    }

    fn dimensions(&self) -> usize {
        self.inner.dimensions()
    }

    fn cache_stats(&self) -> Option<EmbedCacheStats> {
        Some(self.stats())
    }

    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let Some(store) = self.active_store() else {
            self.counters
                .misses
                .fetch_add(texts.len() as u64, Ordering::Relaxed);
            return self.embed_with_model(texts).await;
        };

        // Each distinct text once: `slot_of[i]` is the index in `unique` of text i.
        let mut unique: Vec<(Key, usize)> = Vec::with_capacity(texts.len());
        let mut slot_of = Vec::with_capacity(texts.len());
        let mut seen: HashMap<Key, usize> = HashMap::with_capacity(texts.len());
        for (index, text) in texts.iter().enumerate() {
            let key = self.key(text);
            let slot = match seen.entry(key) {
                Entry::Occupied(entry) => *entry.get(),
                Entry::Vacant(entry) => {
                    unique.push((key, index));
                    *entry.insert(unique.len() - 1)
                }
            };
            slot_of.push(slot);
        }

        let keys: Vec<Key> = unique.iter().map(|(key, _)| *key).collect();
        let dimensions = self.inner.dimensions();
        let found = match self
            .run_blocking(store, move |store| store.lookup(&keys, dimensions))
            .await
        {
            Ok(found) => found,
            Err(error) => {
                self.disable(&error);
                self.counters
                    .misses
                    .fetch_add(texts.len() as u64, Ordering::Relaxed);
                return self.embed_with_model(texts).await;
            }
        };
        let mut vectors: Vec<Option<Vec<f32>>> = found;

        let missing: Vec<usize> = (0..unique.len())
            .filter(|&slot| vectors[slot].is_none())
            .collect();
        let hits = slot_of
            .iter()
            .filter(|&&slot| vectors[slot].is_some())
            .count() as u64;
        self.counters.hits.fetch_add(hits, Ordering::Relaxed);
        self.counters
            .misses
            .fetch_add(texts.len() as u64 - hits, Ordering::Relaxed);

        let mut touches = self.take_touches();
        touches.extend(
            (0..unique.len())
                .filter(|&slot| vectors[slot].is_some())
                .map(|slot| unique[slot].0),
        );

        if missing.is_empty() {
            if touches.len() < TOUCH_FLUSH {
                self.defer_touches(touches);
            } else {
                match self
                    .run_blocking(store, move |store| store.commit(&touches, Vec::new()))
                    .await
                {
                    Ok(evicted) => {
                        self.counters
                            .evictions
                            .fetch_add(evicted, Ordering::Relaxed);
                    }
                    Err(error) => self.disable(&error),
                }
            }
        } else {
            // Every text new and distinct (the common case on a first run): the input slice
            // goes to the model as it is, without copying the texts.
            let embedded = if missing.len() == texts.len() {
                self.embed_with_model(texts).await
            } else {
                let batch: Vec<String> = missing
                    .iter()
                    .map(|&slot| texts[unique[slot].1].clone())
                    .collect();
                self.embed_with_model(&batch).await
            };
            let embedded = match embedded {
                Ok(embedded) if embedded.len() == missing.len() => embedded,
                failed => {
                    // The hits were still used: keep their recency for the next commit.
                    self.defer_touches(touches);
                    return Err(match failed {
                        Ok(embedded) => EmbedError::WrongCount {
                            expected: missing.len(),
                            returned: embedded.len(),
                        },
                        Err(error) => error,
                    });
                }
            };
            // Only vectors of the advertised length are stored; a wrong one is still returned
            // so the caller sees what the model produced.
            let new_entries: Vec<(Key, Vec<u8>)> = missing
                .iter()
                .zip(&embedded)
                .filter(|(_, vector)| vector.len() == dimensions)
                .map(|(&slot, vector)| (unique[slot].0, vector_bytes(vector)))
                .collect();
            for (&slot, vector) in missing.iter().zip(embedded) {
                vectors[slot] = Some(vector);
            }
            // Awaited before returning: the handler call, and so the ACK to Postgres, completes
            // only after the new vectors are durable, so a crash after the ACK finds them.
            match self
                .run_blocking(store, move |store| store.insert(&touches, new_entries))
                .await
            {
                Ok(evicted) => {
                    self.counters
                        .evictions
                        .fetch_add(evicted, Ordering::Relaxed);
                }
                Err(error) => self.disable(&error),
            }
        }

        // Hand each vector out in input order, moving it at its last use and cloning before.
        let mut last_use = vec![0usize; unique.len()];
        for (index, &slot) in slot_of.iter().enumerate() {
            last_use[slot] = index;
        }
        let mut output = Vec::with_capacity(texts.len());
        for (index, &slot) in slot_of.iter().enumerate() {
            let vector = if last_use[slot] == index {
                vectors[slot].take()
            } else {
                vectors[slot].clone()
            };
            output.push(vector.unwrap_or_default());
        }
        Ok(output)
    }
}

fn vector_bytes(vector: &[f32]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(vector.len() * 4);
    for value in vector {
        bytes.extend_from_slice(&value.to_le_bytes());
    }
    bytes
}

fn decode_vector(bytes: &[u8], dimensions: usize) -> Option<Vec<f32>> {
    if bytes.len() != dimensions.checked_mul(4)? {
        return None;
    }
    let (floats, _) = bytes.as_chunks::<4>();
    Some(
        floats
            .iter()
            .map(|&float| f32::from_le_bytes(float))
            .collect(),
    )
}

/// Bytes an entry is charged against the limit.
fn entry_cost(entry_len: usize) -> u64 {
    entry_len as u64 + ENTRY_OVERHEAD
}

/// The redb file and its size bookkeeping. Every method blocks.
struct CacheStore {
    db: Database,
    path: PathBuf,
    /// Bytes the entries may be charged before the oldest are evicted.
    budget: u64,
}

impl CacheStore {
    fn open(path: &Path, max_bytes: u64) -> Result<CacheStore, EmbedCacheError> {
        if let Some(parent) = path
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty())
        {
            std::fs::create_dir_all(parent).map_err(|error| EmbedCacheError::Open {
                path: path.to_owned(),
                source: redb::Error::Io(error),
            })?;
        }
        // redb trusts a file with its magic number and may panic on damage behind it; a
        // damaged cache must not take the host down.
        let opened = std::panic::catch_unwind(|| {
            let db = redb::Builder::new()
                .set_cache_size(PAGE_CACHE_BYTES)
                .create(path)?;
            initialise(&db)?;
            Ok::<_, redb::Error>(db)
        });
        let db = match opened {
            Ok(Ok(db)) => db,
            Ok(Err(redb::Error::DatabaseAlreadyOpen)) => {
                return Err(EmbedCacheError::Locked {
                    path: path.to_owned(),
                });
            }
            Ok(Err(source)) => {
                return Err(EmbedCacheError::Open {
                    path: path.to_owned(),
                    source,
                });
            }
            Err(_panic) => {
                return Err(EmbedCacheError::Damaged {
                    path: path.to_owned(),
                });
            }
        };
        let store = CacheStore {
            db,
            path: path.to_owned(),
            budget: budget(max_bytes),
        };
        store.check_format()?;
        Ok(store)
    }

    fn check_format(&self) -> Result<(), EmbedCacheError> {
        let path = self.path.clone();
        let version = (|| {
            let read = self.db.begin_read()?;
            let meta = match read.open_table(META) {
                Ok(meta) => meta,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(error) => return Err(error.into()),
            };
            Ok::<_, redb::Error>(meta.get(META_FORMAT)?.map(|value| value.value()))
        })()
        .map_err(|source| EmbedCacheError::Open {
            path: path.clone(),
            source,
        })?;
        match version {
            Some(FORMAT_VERSION) => Ok(()),
            Some(found) => Err(EmbedCacheError::FormatVersion { path, found }),
            None => Err(EmbedCacheError::NotACache { path }),
        }
    }

    fn storage_error(&self, source: impl Into<redb::Error>) -> EmbedCacheError {
        EmbedCacheError::Storage {
            path: self.path.clone(),
            source: source.into(),
        }
    }

    /// The stored vector of each key, `None` for a miss or a vector of the wrong length.
    fn lookup(
        &self,
        keys: &[Key],
        dimensions: usize,
    ) -> Result<Vec<Option<Vec<f32>>>, EmbedCacheError> {
        self.guard(|| {
            let read = self.db.begin_read()?;
            let index = read.open_table(INDEX)?;
            let entries = read.open_table(ENTRIES)?;
            let mut found = Vec::with_capacity(keys.len());
            for key in keys {
                let Some(sequence) = index.get(key)?.map(|value| value.value()) else {
                    found.push(None);
                    continue;
                };
                let vector = entries.get(sequence)?.and_then(|value| {
                    let (stored_key, vector) = value.value().split_first_chunk::<32>()?;
                    // A mismatch can only come from a damaged file: treat it as a miss.
                    (stored_key == key)
                        .then(|| decode_vector(vector, dimensions))
                        .flatten()
                });
                found.push(vector);
            }
            Ok(found)
        })
    }

    /// Stores `new_entries` (and the recency of `touched` keys), evicting as needed. A batch that
    /// is large next to the budget is committed in parts: the pages an eviction frees are
    /// reusable only after its commit, so one commit needs room for the old entries and all new
    /// ones at once, and a file sized for the budget would have to grow.
    fn insert(
        &self,
        touched: &[Key],
        new_entries: Vec<(Key, Vec<u8>)>,
    ) -> Result<u64, EmbedCacheError> {
        let part_budget = self.budget / 8;
        let per_entry = new_entries
            .first()
            .map_or(1, |(_, vector)| entry_cost(32 + vector.len()));
        let part_len = usize::try_from(part_budget / per_entry)
            .unwrap_or(usize::MAX)
            .max(1);
        if new_entries.len() <= part_len {
            return self.commit(touched, new_entries);
        }
        let mut evicted = self.commit(touched, Vec::new())?;
        let mut rest = new_entries;
        while !rest.is_empty() {
            let tail = rest.split_off(part_len.min(rest.len()));
            evicted += self.commit(&[], rest)?;
            rest = tail;
        }
        Ok(evicted)
    }

    /// In one transaction: marks `touched` keys as just used, stores `new_entries` and evicts
    /// the least recently used entries if the limit is exceeded. Returns how many were evicted.
    fn commit(
        &self,
        touched: &[Key],
        new_entries: Vec<(Key, Vec<u8>)>,
    ) -> Result<u64, EmbedCacheError> {
        self.guard(|| {
            let write = self.db.begin_write()?;
            // Every commit is fsynced (redb's default, Immediate durability). A commit that
            // adds vectors must be: one that is not is rolled back when the file is next opened
            // after a crash, so the replay the cache exists for would miss. A commit that only
            // records recency (every TOUCH_FLUSH hits) must be too, for another reason: redb
            // frees the pages a non-durable commit replaces only at the next durable one, so a
            // long all-hit replay of non-durable commits would grow the file past its bound.
            // The cost is one fsync per batch with misses or per TOUCH_FLUSH hits.
            let mut evicted = 0;
            {
                let mut index = write.open_table(INDEX)?;
                let mut entries = write.open_table(ENTRIES)?;
                let mut meta = write.open_table(META)?;
                let mut next = meta.get(META_NEXT_USE)?.map_or(0, |value| value.value());
                let mut stored = meta.get(META_BYTES)?.map_or(0, |value| value.value());

                // A touched entry moves to the end of the use order: rewritten under a new
                // sequence number, so eviction can take the oldest from the front.
                for key in touched {
                    let Some(previous) = index.get(key)?.map(|value| value.value()) else {
                        continue; // evicted meanwhile
                    };
                    let Some(entry) = entries
                        .remove(previous)?
                        .map(|value| value.value().to_vec())
                    else {
                        continue;
                    };
                    entries.insert(next, entry.as_slice())?;
                    index.insert(key, next)?;
                    next += 1;
                }
                let mut entry = Vec::new();
                for (key, vector) in &new_entries {
                    if let Some(previous) = index.insert(key, next)?.map(|value| value.value()) {
                        // Another pipeline stored the same text meanwhile: replace, not add.
                        if let Some(old) = entries.remove(previous)? {
                            stored = stored.saturating_sub(entry_cost(old.value().len()));
                        }
                    }
                    entry.clear();
                    entry.extend_from_slice(key);
                    entry.extend_from_slice(vector);
                    entries.insert(next, entry.as_slice())?;
                    stored += entry_cost(entry.len());
                    next += 1;
                }

                if stored > self.budget {
                    let target = (self.budget as f64 * LOW_WATER) as u64;
                    while stored > target {
                        let Some((sequence, entry)) = entries.pop_first()? else {
                            break;
                        };
                        let (sequence, entry) = (sequence.value(), entry.value());
                        stored = stored.saturating_sub(entry_cost(entry.len()));
                        if let Some((key, _)) = entry.split_first_chunk::<32>()
                            && index.get(key)?.map(|value| value.value()) == Some(sequence)
                        {
                            index.remove(key)?;
                        }
                        evicted += 1;
                    }
                }
                meta.insert(META_NEXT_USE, next)?;
                meta.insert(META_BYTES, stored)?;
            }
            write.commit()?;
            Ok(evicted)
        })
    }

    /// Runs a store operation, turning redb errors and panics (redb panics on some damaged
    /// pages) into an [`EmbedCacheError`].
    fn guard<T>(
        &self,
        operation: impl FnOnce() -> Result<T, redb::Error>,
    ) -> Result<T, EmbedCacheError> {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(operation)) {
            Ok(result) => result.map_err(|source| self.storage_error(source)),
            Err(_panic) => Err(EmbedCacheError::Damaged {
                path: self.path.clone(),
            }),
        }
    }
}

/// Creates the tables of a new (empty) file and stamps its format version. A file that already
/// has tables is left untouched: an existing cache needs nothing, and any other redb file is
/// refused by the format check that follows.
fn initialise(db: &Database) -> Result<(), redb::Error> {
    let write = db.begin_write()?;
    if write.list_tables()?.next().is_some() {
        write.abort()?;
        return Ok(());
    }
    {
        write.open_table(ENTRIES)?;
        write.open_table(INDEX)?;
        let mut meta = write.open_table(META)?;
        meta.insert(META_FORMAT, FORMAT_VERSION)?;
    }
    write.commit()?;
    Ok(())
}
