//! Builds pipelines from their [`PipelineSpec`]s: the embedder, the sink, the source and the
//! plugin each spec names, wired into a [`Pipeline`].
//!
//! What pipelines may share is held by [`SharedResources`], one per process: the wasmtime
//! engine (a component file used by several pipelines is compiled once) and the in-process
//! models (one MiniLM per model folder, however many pipelines embed with it). Everything else
//! (a sink's connections, the embedding cache, the replication slot) belongs to one pipeline.
//! Pipelines sharing a model take turns on it, so none can starve the others
//! ([`FairShare`](crate::embed::FairShare)).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;

use crate::config::{EmbedderSpec, PipelineSpec, ProcessSettings, SinkSpec, SpecProblem};
use crate::dead_letter::{DeadLetterError, DeadLetterStore, OnFailure};
use crate::embed::{
    ApiKey, CachingEmbedder, DEFAULT_TURN_TEXTS, EmbedCacheOptions, EmbedError, EmbedQuota,
    Embedder, FairShare, MiniLmEmbedder, MiniLmOptions, NoEmbedder, OpenAiConfig, OpenAiEmbedder,
    default_model_dir,
};
use crate::metrics::Metrics;
use crate::pipeline::{BatchOptions, Pipeline, PipelineConfig, RetryPolicy};
use crate::replication::{ReplicationError, SourceConfig, StreamOptions};
use crate::runtime::{EngineOptions, Limits, Plugin, PluginEngine, RuntimeError};
use crate::sink::{
    JsonLinesSink, PgVectorSink, QdrantOptions, QdrantSink, SearchHit, Sink, SinkError,
    WebhookOptions, WebhookSink,
};
use crate::source::{BackfillSettings, PostgresSource};

/// Why a pipeline could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AssemblyError {
    /// The spec has a problem that can be seen without connecting anywhere.
    #[error("{0}")]
    Spec(#[from] SpecProblem),
    /// A DSN does not parse, or a database cannot be reached.
    #[error("{setting}: {source}")]
    Database {
        /// `source.dsn` or `sink.dsn`.
        setting: &'static str,
        /// Why.
        #[source]
        source: Box<ReplicationError>,
    },
    /// The embedder could not be set up.
    #[error("cannot set up the embedder")]
    Embedder(#[from] EmbedError),
    /// The sink could not be set up.
    #[error("cannot set up the sink")]
    Sink(#[from] SinkError),
    /// The plugin could not be loaded.
    #[error("plugin {}", path.display())]
    Plugin {
        /// The component file.
        path: PathBuf,
        /// Why.
        #[source]
        source: RuntimeError,
    },
    /// The wasmtime engine could not be set up.
    #[error("cannot set up the plugin runtime")]
    Engine(#[source] RuntimeError),
    /// A blocking task (loading a model, compiling a plugin, opening the cache) panicked.
    #[error("{0} panicked")]
    Panicked(&'static str),
    /// The dead-letter table could not be read or written.
    #[error(transparent)]
    DeadLetter(#[from] DeadLetterError),
}

/// What every pipeline of one process shares. Cheap to share by reference; build it once.
pub struct SharedResources {
    engine: PluginEngine,
    /// In-process models by folder and thread count.
    models: Mutex<HashMap<(PathBuf, usize), Arc<dyn Embedder>>>,
    /// Every pipeline's metrics, served by `--metrics-addr`.
    metrics: Arc<Metrics>,
}

impl SharedResources {
    /// Sets up the plugin engine (its compile cache in `settings.plugin_cache_dir`).
    pub fn new(settings: &ProcessSettings) -> Result<SharedResources, AssemblyError> {
        let engine = PluginEngine::new(EngineOptions {
            cache_dir: settings
                .plugin_cache_dir
                .clone()
                .or_else(default_plugin_cache_dir),
        })
        .map_err(AssemblyError::Engine)?;
        Ok(SharedResources {
            engine,
            models: Mutex::new(HashMap::new()),
            metrics: Arc::new(Metrics::new()),
        })
    }

    /// The process's metrics registry.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The engine every plugin is compiled and run by.
    pub fn engine(&self) -> &PluginEngine {
        &self.engine
    }

    /// The embedder `spec` describes. An in-process model is loaded once per folder and
    /// thread count and then shared; a remote one is connected per call.
    pub async fn embedder(&self, spec: &EmbedderSpec) -> Result<Arc<dyn Embedder>, AssemblyError> {
        match spec {
            EmbedderSpec::Minilm { model_dir, threads } => {
                let dir = model_dir
                    .clone()
                    .or_else(default_model_dir)
                    .ok_or_else(|| SpecProblem {
                        setting: "embedder.model_dir",
                        problem: "no embedding model found; name a folder with config.json, \
                                  tokenizer.json and model.safetensors, or run `make setup`"
                            .into(),
                    })?;
                let threads = threads.unwrap_or_else(default_threads).max(1);
                // Held across the load: two pipelines asking for one model at once load it once.
                let mut models = self.models.lock().await;
                if let Some(model) = models.get(&(dir.clone(), threads)) {
                    return Ok(model.clone());
                }
                let options = MiniLmOptions {
                    threads,
                    ..MiniLmOptions::default()
                };
                let load_dir = dir.clone();
                // Reading 90 MB of weights takes a moment: off the async threads.
                let model =
                    tokio::task::spawn_blocking(move || MiniLmEmbedder::load(&load_dir, options))
                        .await
                        .map_err(|_| AssemblyError::Panicked("loading the embedding model"))??;
                // Pipelines sharing the model take turns on it (see `FairShare`).
                let model: Arc<dyn Embedder> =
                    Arc::new(FairShare::new(Arc::new(model), DEFAULT_TURN_TEXTS));
                models.insert((dir, threads), model.clone());
                Ok(model)
            }
            EmbedderSpec::Openai {
                base_url,
                model,
                api_key,
                dimensions,
                max_inputs,
                max_tokens,
                concurrency,
                timeout_ms,
            } => {
                let config = OpenAiConfig {
                    api_key: api_key.as_ref().and_then(|key| ApiKey::new(key.expose())),
                    dimensions: *dimensions,
                    request_timeout: Duration::from_millis(*timeout_ms),
                    max_inputs_per_request: *max_inputs,
                    max_tokens_per_request: *max_tokens,
                    max_concurrent_requests: *concurrency,
                    ..OpenAiConfig::new(base_url, model)
                };
                Ok(Arc::new(OpenAiEmbedder::connect(config).await?))
            }
            EmbedderSpec::None { dimensions } => Ok(Arc::new(NoEmbedder::new(*dimensions))),
        }
    }
}

/// Checks `spec` and builds its pipeline: the embedder (shared or its own), the embedding
/// cache, the sink, the source and the plugin. Connects to nothing but a remote embedder
/// (which is asked its vector size); the source and the sink are prepared when the pipeline
/// runs.
pub async fn assemble(
    spec: &PipelineSpec,
    shared: &SharedResources,
) -> Result<Pipeline, AssemblyError> {
    assemble_with_fallback(spec, shared, None).await
}

/// [`assemble`], but when the plugin file no longer loads and `fallback` is a version loaded
/// from the same file earlier (the one running before a restart), that version is used, with a
/// warning: a broken deploy, already rejected by a hot reload, must not take a pipeline down
/// at its next restart.
pub async fn assemble_with_fallback(
    spec: &PipelineSpec,
    shared: &SharedResources,
    fallback: Option<Plugin>,
) -> Result<Pipeline, AssemblyError> {
    if let Some(problem) = spec.validate().into_iter().next() {
        return Err(problem.into());
    }
    let source_config = parse_dsn("source.dsn", spec.source.dsn.expose())?;
    let embedder = with_cache(spec, shared.embedder(&spec.embedder).await?).await?;
    // The pipeline's limits come first: a call over them costs nothing, not even a cache lookup.
    let embedder: Arc<dyn Embedder> = Arc::new(EmbedQuota::new(embedder, spec.embed_limits()));
    let sink = sink(spec, &source_config)?;
    let dead_letters = match spec.on_failure {
        OnFailure::Stop => None,
        OnFailure::DeadLetter => Some(dead_letter_store(spec, &source_config)?),
    };
    let source = PostgresSource::new(
        &spec.name,
        source_config,
        spec.tables.clone(),
        spec.slot_name(),
        spec.publication_name(),
        StreamOptions::default(),
    )
    .with_backfill(BackfillSettings {
        initial: spec.initial_backfill_tables(),
        progress_interval: Duration::from_secs(spec.progress_secs.max(1)),
    });
    let plugin = match load_plugin(shared, &spec.plugin).await {
        Ok(plugin) => plugin,
        Err(error) => match fallback.filter(|plugin| plugin.path() == spec.plugin) {
            Some(plugin) => {
                let error = crate::error_chain::one_line(&error);
                tracing::warn!(
                    pipeline = %spec.name, %error, running = %plugin.digest(),
                    "the plugin file does not load; running the last version that did"
                );
                plugin
            }
            None => return Err(error),
        },
    };
    let pipeline = Pipeline::new(
        pipeline_config(spec),
        plugin,
        embedder,
        sink,
        Box::new(source),
    );
    Ok(match dead_letters {
        Some(store) => pipeline.with_dead_letters(store),
        None => pipeline,
    })
}

/// What a replay of dead letters did.
#[derive(Debug, Default)]
pub struct ReplayReport {
    /// Dead letters the handler and the sink took this time; removed from the table.
    pub replayed: Vec<i64>,
    /// Those that failed again, with the error; kept, their attempts counted.
    pub failed: Vec<(i64, String)>,
    /// Why the replay stopped before the end (an outage), if it did; the rest stays.
    pub interrupted: Option<String>,
}

/// Runs the dead letters of `spec`'s slot (`only` narrows to one) through its current handler
/// and sink, one event per handler call, oldest first; removes those that succeed and notes a
/// new failure on the others. Stops at an outage of the embedder or the sink (what is left is
/// kept for the next replay).
pub async fn replay_dead_letters(
    spec: &PipelineSpec,
    shared: &SharedResources,
    only: Option<i64>,
) -> Result<ReplayReport, AssemblyError> {
    use crate::pipeline::PipelineImports;
    use crate::runtime::ImportErrorKind;

    let source_config = parse_dsn("source.dsn", spec.source.dsn.expose())?;
    let store = dead_letter_store(spec, &source_config)?;
    let letters = store.list(spec.slot_name(), only).await?;
    let mut report = ReplayReport::default();
    if letters.is_empty() {
        return Ok(report);
    }
    let embedder = with_cache(spec, shared.embedder(&spec.embedder).await?).await?;
    let embedder: Arc<dyn Embedder> = Arc::new(EmbedQuota::new(embedder, spec.embed_limits()));
    let sink = sink(spec, &source_config)?;
    sink.prepare(embedder.dimensions()).await?;
    let plugin = load_plugin(shared, &spec.plugin).await?;
    let imports = Arc::new(PipelineImports::new(embedder, sink.clone(), &spec.tables));
    let limits = pipeline_config(spec).limits;
    let log_target = format!("{}/dead-letters", spec.name);
    let instantiate = || async {
        plugin
            .instantiate(imports.clone(), limits, &log_target)
            .await
            .map_err(|source| AssemblyError::Plugin {
                path: spec.plugin.clone(),
                source,
            })
    };
    let mut instance = instantiate().await?;
    for letter in letters {
        if instance.is_poisoned() {
            instance = instantiate().await?;
        }
        let events = std::slice::from_ref(&letter.event);
        sink.begin_batch(events);
        match instance.handle(events).await {
            Ok(()) => report.replayed.push(letter.id),
            Err(error) => {
                let outage = instance
                    .last_import_failure()
                    .is_some_and(|failure| failure.kind == ImportErrorKind::Unavailable);
                let message = crate::error_chain::one_line(&error);
                if outage {
                    report.interrupted = Some(format!(
                        "the embedder or the sink is unavailable at dead letter {}: {message}",
                        letter.id
                    ));
                    break;
                }
                store.failed_again(letter.id, &message).await?;
                report.failed.push((letter.id, message));
            }
        }
    }
    store.remove(&report.replayed).await?;
    Ok(report)
}

/// The dead-letter table of `spec`: in `dead_letter_dsn`'s database, else the pgvector
/// sink's, else the source's. Connects lazily.
pub fn dead_letter_store(
    spec: &PipelineSpec,
    source: &SourceConfig,
) -> Result<DeadLetterStore, AssemblyError> {
    let (setting, config) = match (&spec.dead_letter_dsn, &spec.sink) {
        (Some(dsn), _) => (
            "dead_letter_dsn",
            parse_dsn("dead_letter_dsn", dsn.expose())?,
        ),
        (None, SinkSpec::Pgvector { dsn: Some(dsn), .. }) => {
            ("sink.dsn", parse_dsn("sink.dsn", dsn.expose())?)
        }
        (None, _) => ("source.dsn", source.clone()),
    };
    let pool =
        config
            .pool(2, Duration::from_secs(60))
            .map_err(|source| AssemblyError::Database {
                setting,
                source: Box::new(source),
            })?;
    Ok(DeadLetterStore::new(pool, &config.display()))
}

/// How the pipeline of `spec` runs, apart from its parts.
pub fn pipeline_config(spec: &PipelineSpec) -> PipelineConfig {
    PipelineConfig {
        name: spec.name.clone(),
        slot: spec.slot_name().to_owned(),
        plugin: spec.plugin.clone(),
        tables: spec.tables.clone(),
        limits: Limits {
            call_timeout: Duration::from_millis(spec.call_timeout_ms),
            memory_bytes: spec.memory_limit_mb.saturating_mul(1024 * 1024),
        },
        batch: BatchOptions {
            max_events: spec.batch_size,
            max_wait: Duration::from_millis(spec.batch_wait_ms),
        },
        retry: RetryPolicy {
            max_attempts: spec.max_attempts,
            initial_backoff: Duration::from_millis(spec.retry_backoff_ms),
            outage_limit: Duration::from_secs(spec.outage_limit_secs),
            ..RetryPolicy::default()
        },
        stop_at: spec.stop_at_lsn,
        progress_interval: Duration::from_secs(spec.progress_secs),
        on_failure: spec.on_failure,
    }
}

/// Loads (compiles, or takes from the engine's cache) a plugin. Compiling one that is not in
/// the cache takes seconds of CPU, so it runs on the blocking pool.
pub async fn load_plugin(
    shared: &SharedResources,
    path: &std::path::Path,
) -> Result<Plugin, AssemblyError> {
    let engine = shared.engine.clone();
    let load_path = path.to_owned();
    tokio::task::spawn_blocking(move || engine.load(&load_path))
        .await
        .map_err(|_| AssemblyError::Panicked("loading the plugin"))?
        .map_err(|source| AssemblyError::Plugin {
            path: path.to_owned(),
            source,
        })
}

/// Wraps `embedder` in the spec's embedding cache, if it has one.
async fn with_cache(
    spec: &PipelineSpec,
    embedder: Arc<dyn Embedder>,
) -> Result<Arc<dyn Embedder>, AssemblyError> {
    let Some(cache) = &spec.embed_cache else {
        return Ok(embedder);
    };
    let options = EmbedCacheOptions {
        path: cache.path.clone(),
        max_bytes: cache.max_mb.saturating_mul(1024 * 1024),
    };
    // Opening after a crash makes redb check the whole file: off the async threads.
    let cached = tokio::task::spawn_blocking(move || CachingEmbedder::open(embedder, &options))
        .await
        .map_err(|_| AssemblyError::Panicked("opening the embedding cache"))?;
    Ok(Arc::new(cached))
}

/// The sink of `spec`, writing its namespace. Connects lazily: nothing is reached before the
/// pipeline prepares it.
pub fn sink(spec: &PipelineSpec, source: &SourceConfig) -> Result<Arc<dyn Sink>, AssemblyError> {
    Ok(match &spec.sink {
        SinkSpec::Pgvector { dsn, pool_size } => {
            let sink_source = match dsn {
                Some(dsn) => parse_dsn("sink.dsn", dsn.expose())?,
                None => source.clone(),
            };
            let table = spec.pgvector_table()?;
            let pool = sink_source
                .pool(*pool_size, Duration::from_secs(60))
                .map_err(|source| AssemblyError::Database {
                    setting: "sink.dsn",
                    source: Box::new(source),
                })?;
            Arc::new(PgVectorSink::new(pool, &table.schema, &table.name))
        }
        SinkSpec::Qdrant { .. } => Arc::new(qdrant_sink(spec)?),
        SinkSpec::Jsonl => Arc::new(JsonLinesSink::open(&spec.jsonl_path()?)?),
        SinkSpec::Webhook {
            url,
            secret,
            timeout_ms,
            max_attempts,
        } => Arc::new(WebhookSink::new(WebhookOptions {
            url: url.parse().map_err(|error| SpecProblem {
                setting: "sink.url",
                problem: format!("{url:?} is not a URL: {error}"),
            })?,
            secret: secret.as_ref().map(|secret| secret.expose().to_owned()),
            timeout: Duration::from_millis(*timeout_ms),
            max_attempts: *max_attempts,
            initial_backoff: Duration::from_millis(spec.retry_backoff_ms),
            slot: spec.slot_name().to_owned(),
            pipeline: spec.name.clone(),
        })?),
    })
}

fn qdrant_sink(spec: &PipelineSpec) -> Result<QdrantSink, AssemblyError> {
    let SinkSpec::Qdrant {
        url,
        api_key,
        timeout_ms,
        max_attempts,
        create_collection,
    } = &spec.sink
    else {
        return Err(SpecProblem {
            setting: "sink",
            problem: "not a Qdrant sink".into(),
        }
        .into());
    };
    let mut options = QdrantOptions::new(url, &spec.qdrant_collection()?);
    options.api_key = api_key
        .as_ref()
        .map(|key| key.expose().to_owned())
        .filter(|key| !key.is_empty());
    options.timeout = Duration::from_millis(*timeout_ms);
    options.max_attempts = *max_attempts;
    options.create_collection = *create_collection;
    Ok(QdrantSink::new(options)?)
}

/// The points of `spec`'s sink nearest to `query`, embedded by its embedder, and the
/// namespace they were found in.
pub async fn search(
    spec: &PipelineSpec,
    shared: &SharedResources,
    query: &str,
    limit: u64,
) -> Result<(Vec<SearchHit>, String), AssemblyError> {
    let embedder = shared.embedder(&spec.embedder).await?;
    let vector = embedder
        .embed(std::slice::from_ref(&query.to_owned()))
        .await?
        .pop()
        .ok_or_else(|| {
            AssemblyError::Embedder(EmbedError::InvalidResponse {
                endpoint: embedder.model_id().to_owned(),
                reason: "no vector for the query".into(),
            })
        })?;
    match &spec.sink {
        SinkSpec::Qdrant { .. } => {
            let hits = qdrant_sink(spec)?.search(vector, limit).await?;
            Ok((hits, spec.qdrant_collection()?))
        }
        SinkSpec::Pgvector { dsn, .. } => {
            let table = spec.pgvector_table()?;
            let (setting, dsn) = match dsn {
                Some(dsn) => ("sink.dsn", dsn.expose()),
                None => ("source.dsn", spec.source.dsn.expose()),
            };
            let database = |source| AssemblyError::Database {
                setting,
                source: Box::new(source),
            };
            let client = parse_dsn(setting, dsn)?
                .connect_sql()
                .await
                .map_err(database)?;
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let hits =
                PgVectorSink::search(&client, &table.schema, &table.name, vector, limit).await?;
            Ok((hits, table.to_string()))
        }
        SinkSpec::Jsonl | SinkSpec::Webhook { .. } => Err(SpecProblem {
            setting: "sink",
            problem: format!(
                "a {} sink cannot be searched; search a pgvector or Qdrant sink",
                spec.sink.kind()
            ),
        }
        .into()),
    }
}

/// Parses a DSN, naming the setting it came from when it does not parse.
pub fn parse_dsn(setting: &'static str, dsn: &str) -> Result<SourceConfig, AssemblyError> {
    SourceConfig::from_dsn(dsn).map_err(|source| AssemblyError::Database {
        setting,
        source: Box::new(source),
    })
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn default_plugin_cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))?;
    Some(base.join("pgstream-host"))
}
