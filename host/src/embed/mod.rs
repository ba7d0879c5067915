//! Embedders turn texts into vectors. The pipeline reaches them only through the [`Embedder`]
//! trait, so a deployment can pick the in-process model ([`MiniLmEmbedder`]) or a remote
//! OpenAI-compatible server ([`OpenAiEmbedder`]) per pipeline without the plugin runtime or the
//! sinks knowing which.

mod cache;
mod fair_share;
mod minilm;
pub(crate) mod openai;
mod quota;

use std::path::PathBuf;

use async_trait::async_trait;

pub use cache::{CachingEmbedder, EmbedCacheError, EmbedCacheOptions, EmbedCacheStats};
pub use fair_share::{DEFAULT_TURN_TEXTS, FairShare};
pub use minilm::{MiniLmEmbedder, MiniLmOptions, default_model_dir};
pub use openai::{
    API_KEY_ENV, ApiKey, DEFAULT_BASE_URL, DEFAULT_MODEL, FALLBACK_API_KEY_ENV, OpenAiConfig,
    OpenAiEmbedder, RetryPolicy as OpenAiRetryPolicy,
};
pub use quota::{DEFAULT_MAX_BYTES_PER_CALL, DEFAULT_MAX_TEXTS_PER_CALL, EmbedLimits, EmbedQuota};

/// An error from a model runtime or tokenizer, kept as the `source` of an [`EmbedError`] so
/// this module does not tie its public API to one inference library.
pub type ModelError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why an embedding call failed.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// The model files could not be read or understood.
    #[error("cannot load the embedding model from {}", path.display())]
    Load {
        /// The model folder or file.
        path: PathBuf,
        /// What was wrong with it.
        #[source]
        source: ModelError,
    },
    /// A text could not be turned into model input.
    #[error("cannot tokenize the texts to embed")]
    Tokenize(#[source] ModelError),
    /// The model failed while computing embeddings.
    #[error("embedding failed")]
    Inference(#[source] ModelError),
    /// The pipeline has no embedder (`--embedder none`) but its handler asked for vectors.
    #[error(
        "the handler asked to embed {texts} texts but the pipeline has no embedder \
         (--embedder none); choose one with --embedder"
    )]
    NotConfigured {
        /// How many texts the handler sent.
        texts: usize,
    },
    /// The handler asked more of the embedder in one call than its pipeline allows
    /// ([`EmbedLimits`]); the same call will be refused again.
    #[error(
        "the handler asked to embed {asked} in one call, over its pipeline's limit of {limit}; \
         send smaller calls or raise the limit"
    )]
    OverLimit {
        /// What the call asked for (`"12000 texts"`).
        asked: String,
        /// The limit it broke (`"10000 texts per call"`).
        limit: String,
    },
    /// An embedder returned another number of vectors than it was given texts.
    #[error("the embedder returned {returned} vectors for {expected} texts")]
    WrongCount {
        /// Texts sent.
        expected: usize,
        /// Vectors returned.
        returned: usize,
    },
    /// The worker thread that ran the model panicked or was cancelled.
    #[error("the embedding worker stopped before finishing")]
    Worker(#[source] tokio::task::JoinError),
    /// The embedder's settings cannot work (a malformed base URL, a zero limit, ...).
    #[error("invalid embedder configuration: {reason}")]
    Config {
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// The embedding server could not be reached, timed out, was rate-limiting or failing
    /// (429, 5xx) on every try. It may recover: the call can be repeated later.
    #[error("embedding server {endpoint} unavailable after {attempts} tries: {reason}")]
    Unavailable {
        /// The URL requests went to.
        endpoint: String,
        /// How many requests were sent.
        attempts: u32,
        /// What the last try ran into.
        reason: String,
        /// The transport error of the last try, if it was one.
        #[source]
        source: Option<ModelError>,
    },
    /// The embedding server refused the request (a 4xx other than 408 and 429, or a 429 for
    /// an exhausted quota); sending it again will not help.
    #[error("embedding server {endpoint} rejected the request with HTTP {status}: {message}")]
    Rejected {
        /// The URL the request went to.
        endpoint: String,
        /// The HTTP status.
        status: u16,
        /// The server's own message (with the API key scrubbed out).
        message: String,
    },
    /// The embedding server answered 2xx with something that is not a valid embeddings
    /// response for the request (wrong count, bad index, not JSON, too large).
    #[error("embedding server {endpoint} sent an unusable answer: {reason}")]
    InvalidResponse {
        /// The URL the request went to.
        endpoint: String,
        /// What was wrong with the answer.
        reason: String,
    },
    /// A vector had another length than the embedder reports, which the sink was prepared
    /// for; mixing sizes would corrupt the index.
    #[error(
        "model {model} returned a vector of {actual} dimensions, expected {expected}; \
         if the model changed, write to a new collection (or set --dimensions to what the \
         collection holds, for models that can shorten vectors)"
    )]
    DimensionMismatch {
        /// The model asked.
        model: String,
        /// The size the embedder reports.
        expected: usize,
        /// The size received.
        actual: usize,
    },
}

impl EmbedError {
    /// Whether trying the same call again may succeed: only when a remote server was
    /// unavailable. An in-process model is deterministic, and a request a server rejected or
    /// answered wrongly gets the same treatment next time.
    pub fn is_retryable(&self) -> bool {
        matches!(self, EmbedError::Unavailable { .. })
    }
}

/// Turns texts into fixed-size vectors.
///
/// Contract: `embed` is called with a whole batch (all the texts a handler asked for in one
/// call) and returns exactly one vector of [`Embedder::dimensions`] floats per text, in input
/// order. It is pure: the same text always gives the same vector, so a replayed batch is safe.
/// Implementations must be cheap to share (`Arc`) between pipelines and tasks.
#[async_trait]
pub trait Embedder: Send + Sync {
    /// A stable name for the model, e.g. `all-MiniLM-L6-v2`; vectors from different models
    /// must never be mixed, so caches key on it.
    fn model_id(&self) -> &str;

    /// Length of every vector this embedder returns.
    fn dimensions(&self) -> usize;

    /// Embeds a batch of texts.
    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError>;

    /// Counters of the embedding cache in front of the model, for progress and summary logs;
    /// `None` (the default) for an embedder without one.
    fn cache_stats(&self) -> Option<EmbedCacheStats> {
        None
    }
}

/// An embedder for pipelines whose handler never embeds (benchmarks, payload-only sinks): it
/// reports a dimension so the sink can be prepared, and fails every `embed` call with a message
/// saying how to configure a real one.
pub struct NoEmbedder {
    dimensions: usize,
}

impl NoEmbedder {
    /// An embedder that claims vectors of `dimensions` floats but makes none.
    pub fn new(dimensions: usize) -> NoEmbedder {
        NoEmbedder { dimensions }
    }
}

#[async_trait]
impl Embedder for NoEmbedder {
    fn model_id(&self) -> &str {
        "none"
    }

    fn dimensions(&self) -> usize {
        self.dimensions
    }

    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        Err(EmbedError::NotConfigured { texts: texts.len() })
    }
}
