//! Embedders turn texts into vectors. The pipeline reaches them only through the [`Embedder`]
//! trait, so a deployment can pick the in-process model or (later) a remote model server per
//! pipeline without the plugin runtime or the sinks knowing which.

mod cache;
mod minilm;

use std::path::PathBuf;

use async_trait::async_trait;

pub use cache::{CachingEmbedder, EmbedCacheError, EmbedCacheOptions, EmbedCacheStats};
pub use minilm::{MiniLmEmbedder, MiniLmOptions, default_model_dir};

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
}

impl EmbedError {
    /// Whether trying the same call again may succeed. An in-process model is deterministic, so
    /// none of its failures go away by themselves.
    pub fn is_retryable(&self) -> bool {
        false
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
