//! The forward pass of `all-MiniLM-L6-v2`'s BERT encoder on the CPU, written for this one model
//! rather than run through candle-transformers' general `BertModel`. It computes the same
//! function (`host/tests/embedder.rs` holds it within 1e-5 of sentence-transformers) with less
//! work around the matmuls, which stay with candle (`gemm`, split across the caller's rayon
//! pool):
//!
//! - Texts are packed, not padded: the token rows of every text of a sub-batch are stacked into
//!   one matrix for the dense layers, and attention runs text by text over that text's own
//!   tokens. In BERT's masked softmax a padded key gets a weight of exactly 0, so leaving the
//!   padding out changes nothing but the work.
//! - Query, key and value come from one matmul against their three weights side by side.
//! - Bias, residual, layer norm, GELU and attention are each one pass over a matmul's output on
//!   the caller's rayon pool, where candle would run several element-wise ops, each a full copy
//!   of the tensor on its process-wide spinning thread pool.
//! - GELU's erf is a rational approximation that the compiler vectorises ([`erf`]) instead of
//!   libm's scalar `erff`, which took 15% of the time.

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Storage, Tensor, bail};
use rayon::prelude::*;

/// Width of the hidden states: the model's vector length.
pub(super) const HIDDEN: usize = 384;
/// Attention heads per layer.
const HEADS: usize = 12;
/// Width of one head's queries, keys and values.
const HEAD_SIZE: usize = HIDDEN / HEADS;
/// Width of the feed-forward layer.
const INTERMEDIATE: usize = 1536;
/// Transformer layers.
pub(super) const LAYERS: usize = 6;
/// Fewest rows one rayon task of a row-wise pass takes, so tiny tasks do not cost more to hand
/// out than to run.
const MIN_ROWS_PER_TASK: usize = 8;

/// The fields of the model's `config.json` this encoder depends on; `load` refuses any other
/// shape, so another BERT folder is not run with the wrong code.
#[derive(Debug, serde::Deserialize)]
pub(super) struct Config {
    pub(super) hidden_size: usize,
    pub(super) num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    hidden_act: String,
    layer_norm_eps: f64,
    vocab_size: usize,
    max_position_embeddings: usize,
}

impl Config {
    /// Why this configuration is not the one the encoder implements, if it is not.
    pub(super) fn mismatch(&self) -> Option<String> {
        let expected = (HIDDEN, LAYERS, HEADS, INTERMEDIATE, "gelu");
        let found = (
            self.hidden_size,
            self.num_hidden_layers,
            self.num_attention_heads,
            self.intermediate_size,
            self.hidden_act.as_str(),
        );
        (expected != found).then(|| {
            format!(
                "expected all-MiniLM-L6-v2 (hidden, layers, heads, intermediate, activation) = \
                 {expected:?}, found {found:?}"
            )
        })
    }
}

/// The model's weights, laid out for the forward pass.
pub(super) struct Encoder {
    /// `vocab_size` rows of `HIDDEN`.
    word_embeddings: Vec<f32>,
    /// `max_position_embeddings` rows of `HIDDEN`.
    position_embeddings: Vec<f32>,
    /// The embedding of token type 0, the type of every token of a single text.
    token_type_embedding: Vec<f32>,
    vocab_size: usize,
    max_positions: usize,
    embeddings_norm: LayerNorm,
    layers: Vec<Layer>,
}

/// One transformer layer.
struct Layer {
    /// Query, key and value projections in one: `HIDDEN` in, `3 * HIDDEN` out.
    qkv: Linear,
    attention_output: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

/// A dense layer: `x W^T + b`, with `W^T` kept as a contiguous `(in, out)` matrix.
struct Linear {
    weight: Tensor,
    bias: Vec<f32>,
}

/// Layer normalisation over the last dimension.
struct LayerNorm {
    weight: Vec<f32>,
    bias: Vec<f32>,
    eps: f32,
}

impl Encoder {
    /// Builds the encoder from the bytes of `model.safetensors` and the parsed configuration,
    /// which must pass [`Config::mismatch`].
    pub(super) fn load(weights: &[u8], config: &Config) -> Result<Self> {
        if let Some(mismatch) = config.mismatch() {
            bail!("{mismatch}");
        }
        let tensors = candle_core::safetensors::load_buffer(weights, &Device::Cpu)?;
        let weights = Weights {
            tensors,
            eps: config.layer_norm_eps as f32,
        };
        let vocab_size = config.vocab_size;
        let max_positions = config.max_position_embeddings;
        let token_types = weights.matrix("embeddings.token_type_embeddings.weight", (2, HIDDEN))?;
        let layers = (0..LAYERS)
            .map(|index| weights.layer(&format!("encoder.layer.{index}")))
            .collect::<Result<_>>()?;
        Ok(Self {
            word_embeddings: to_vec(
                weights.matrix("embeddings.word_embeddings.weight", (vocab_size, HIDDEN))?,
            )?,
            position_embeddings: to_vec(weights.matrix(
                "embeddings.position_embeddings.weight",
                (max_positions, HIDDEN),
            )?)?,
            token_type_embedding: to_vec(token_types.get(0)?)?,
            vocab_size,
            max_positions,
            embeddings_norm: weights.layer_norm("embeddings.LayerNorm")?,
            layers,
        })
    }

    /// The last hidden states of every text, mean-pooled over its tokens and scaled to unit
    /// length, as sentence-transformers' `Pooling` and `Normalize` modules do. Each text is
    /// its token ids, special tokens included.
    pub(super) fn embed(&self, texts: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        let lengths: Vec<usize> = texts.iter().map(|ids| ids.len()).collect();
        let rows: usize = lengths.iter().sum();
        if rows == 0 {
            return Ok(vec![vec![0.0; HIDDEN]; texts.len()]);
        }
        let mut tokens = Vec::with_capacity(rows);
        for ids in texts {
            if ids.len() > self.max_positions {
                bail!(
                    "{} tokens, more than the model's {}",
                    ids.len(),
                    self.max_positions
                );
            }
            for (position, &id) in ids.iter().enumerate() {
                let id = id as usize;
                if id >= self.vocab_size {
                    bail!(
                        "token id {id} is outside the vocabulary of {}",
                        self.vocab_size
                    );
                }
                tokens.push((id, position));
            }
        }

        let mut hidden = vec![0f32; rows * HIDDEN];
        hidden
            .par_chunks_mut(HIDDEN)
            .zip(tokens.par_iter())
            .with_min_len(MIN_ROWS_PER_TASK)
            .for_each(|(row, &(id, position))| {
                let word = &self.word_embeddings[id * HIDDEN..][..HIDDEN];
                let place = &self.position_embeddings[position * HIDDEN..][..HIDDEN];
                // The order of BERT's sums: (word + token type) + position.
                for (((x, &w), &t), &p) in row
                    .iter_mut()
                    .zip(word)
                    .zip(&self.token_type_embedding)
                    .zip(place)
                {
                    *x = (w + t) + p;
                }
                self.embeddings_norm.apply(row);
            });
        let mut hidden = Tensor::from_vec(hidden, (rows, HIDDEN), &Device::Cpu)?;
        for layer in &self.layers {
            hidden = layer.forward(&hidden, &lengths)?;
        }

        with_slice(&hidden, |hidden| {
            let mut start = 0;
            lengths
                .iter()
                .map(|&length| {
                    let rows = &hidden[start * HIDDEN..(start + length) * HIDDEN];
                    start += length;
                    mean_pool_normalised(rows, length)
                })
                .collect()
        })
    }
}

/// The mean of `length` rows of `HIDDEN`, scaled to unit length, with sentence-transformers'
/// floors (a count of at least 1e-9, a norm of at least 1e-12), so every input stays finite.
fn mean_pool_normalised(rows: &[f32], length: usize) -> Vec<f32> {
    let mut sum = vec![0f32; HIDDEN];
    for row in rows.chunks_exact(HIDDEN) {
        for (s, &x) in sum.iter_mut().zip(row) {
            *s += x;
        }
    }
    let count = (length as f32).max(1e-9);
    for s in &mut sum {
        *s /= count;
    }
    let norm = sum.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    for s in &mut sum {
        *s /= norm;
    }
    sum
}

impl Layer {
    /// One layer over the packed hidden states of texts of `lengths` tokens each.
    fn forward(&self, hidden: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let rows = hidden.dim(0)?;
        let qkv = hidden.matmul(&self.qkv.weight)?;
        let context = with_slice(&qkv, |qkv| attention(qkv, &self.qkv.bias, lengths))?;
        let context = Tensor::from_vec(context, (rows, HIDDEN), &Device::Cpu)?;
        let projected = context.matmul(&self.attention_output.weight)?;
        let attended = add_and_norm(
            &projected,
            &self.attention_output.bias,
            hidden,
            &self.attention_norm,
        )?;
        let intermediate = attended.matmul(&self.intermediate.weight)?;
        let activated = bias_gelu(&intermediate, &self.intermediate.bias)?;
        let output = activated.matmul(&self.output.weight)?;
        add_and_norm(&output, &self.output.bias, &attended, &self.output_norm)
    }
}

/// Multi-head self-attention, text by text: `qkv` holds each token's query, key and value
/// projections side by side (before their bias), and the result each token's context vector,
/// its heads side by side, in the same packed rows.
fn attention(qkv: &[f32], bias: &[f32], lengths: &[usize]) -> Vec<f32> {
    let rows: usize = lengths.iter().sum();
    let mut context = vec![0f32; rows * HIDDEN];
    let mut texts = Vec::with_capacity(lengths.len());
    let mut rest = context.as_mut_slice();
    let mut start = 0;
    for &length in lengths {
        let (block, tail) = std::mem::take(&mut rest).split_at_mut(length * HIDDEN);
        texts.push((
            &qkv[start * 3 * HIDDEN..(start + length) * 3 * HIDDEN],
            block,
        ));
        rest = tail;
        start += length;
    }
    texts
        .into_par_iter()
        .for_each(|(qkv, context)| attend(qkv, bias, context));
    context
}

/// Attention within one text of `context.len() / HIDDEN` tokens.
fn attend(qkv: &[f32], bias: &[f32], context: &mut [f32]) {
    let length = context.len() / HIDDEN;
    let scale = 1.0 / (HEAD_SIZE as f32).sqrt();
    // One head at a time, copied out contiguous with the bias added: queries and values by
    // token, keys by dimension, so that every inner loop runs over contiguous memory.
    let mut queries = vec![0f32; length * HEAD_SIZE];
    let mut keys = vec![0f32; HEAD_SIZE * length];
    let mut values = vec![0f32; length * HEAD_SIZE];
    let mut weights = vec![0f32; length];
    let mut sum = [0f32; HEAD_SIZE];
    for head in 0..HEADS {
        let (q, k, v) = (
            head * HEAD_SIZE,
            HIDDEN + head * HEAD_SIZE,
            2 * HIDDEN + head * HEAD_SIZE,
        );
        for (token, row) in qkv.chunks_exact(3 * HIDDEN).enumerate() {
            for d in 0..HEAD_SIZE {
                queries[token * HEAD_SIZE + d] = row[q + d] + bias[q + d];
                keys[d * length + token] = row[k + d] + bias[k + d];
                values[token * HEAD_SIZE + d] = row[v + d] + bias[v + d];
            }
        }
        for (query, out) in queries
            .chunks_exact(HEAD_SIZE)
            .zip(context.chunks_exact_mut(HIDDEN))
        {
            weights.fill(0.0);
            for (&qd, keys_d) in query.iter().zip(keys.chunks_exact(length)) {
                for (w, &kd) in weights.iter_mut().zip(keys_d) {
                    *w += qd * kd;
                }
            }
            let max = weights
                .iter()
                .fold(f32::NEG_INFINITY, |max, &w| max.max(w * scale));
            let mut total = 0.0;
            for w in &mut weights {
                *w = (*w * scale - max).exp();
                total += *w;
            }
            let inverse = 1.0 / total;
            sum.fill(0.0);
            for (&w, value) in weights.iter().zip(values.chunks_exact(HEAD_SIZE)) {
                let w = w * inverse;
                for (s, &x) in sum.iter_mut().zip(value) {
                    *s += w * x;
                }
            }
            out[head * HEAD_SIZE..][..HEAD_SIZE].copy_from_slice(&sum);
        }
    }
}

/// `layer_norm(matmul + bias + residual)` row by row, the end of both halves of a layer.
fn add_and_norm(
    matmul: &Tensor,
    bias: &[f32],
    residual: &Tensor,
    norm: &LayerNorm,
) -> Result<Tensor> {
    let rows = matmul.dim(0)?;
    let mut out = vec![0f32; rows * HIDDEN];
    with_slice(matmul, |matmul| {
        with_slice(residual, |residual| {
            out.par_chunks_mut(HIDDEN)
                .zip(matmul.par_chunks(HIDDEN))
                .zip(residual.par_chunks(HIDDEN))
                .with_min_len(MIN_ROWS_PER_TASK)
                .for_each(|((out, matmul), residual)| {
                    for (((o, &m), &b), &r) in out.iter_mut().zip(matmul).zip(bias).zip(residual) {
                        *o = (m + b) + r;
                    }
                    norm.apply(out);
                });
        })
    })??;
    Tensor::from_vec(out, (rows, HIDDEN), &Device::Cpu)
}

/// `gelu(matmul + bias)`, GELU being the exact one, `x * Φ(x)` through erf.
fn bias_gelu(matmul: &Tensor, bias: &[f32]) -> Result<Tensor> {
    let rows = matmul.dim(0)?;
    let mut out = vec![0f32; rows * INTERMEDIATE];
    with_slice(matmul, |matmul| {
        out.par_chunks_mut(INTERMEDIATE)
            .zip(matmul.par_chunks(INTERMEDIATE))
            .with_min_len(MIN_ROWS_PER_TASK)
            .for_each(|(out, matmul)| {
                for ((o, &m), &b) in out.iter_mut().zip(matmul).zip(bias) {
                    let x = m + b;
                    *o = 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
                }
            });
    })?;
    Tensor::from_vec(out, (rows, INTERMEDIATE), &Device::Cpu)
}

/// erf as the rational function `x P(x²) / Q(x²)` on [-4, 4] (beyond, erf is ±1 in f32), the
/// approximation of Eigen's `generic_fast_erf_float` (also XLA's and TVM's). It has no branch
/// and no call, so a loop over it vectorises; its largest error against libm's `erff` over all
/// of f32 is checked in the tests below.
#[inline]
pub(super) fn erf(x: f32) -> f32 {
    // Eigen's coefficients, highest power first; f64 literals, rounded to f32 once below.
    const ALPHA: [f64; 7] = [
        -2.72614225801306e-10,
        2.77068142495902e-08,
        -2.10102402082508e-06,
        -5.69250639462346e-05,
        -7.34990630326855e-04,
        -2.95459980854025e-03,
        -1.60960333262415e-02,
    ];
    const BETA: [f64; 5] = [
        -1.45660718464996e-05,
        -2.13374055278905e-04,
        -1.68282697438203e-03,
        -7.37332916720468e-03,
        -1.42647390514189e-02,
    ];
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let p = ALPHA.iter().fold(0.0, |p, &a| p * x2 + a as f32);
    let q = BETA.iter().fold(0.0, |q, &b| q * x2 + b as f32);
    x * p / q
}

impl LayerNorm {
    /// Normalises one row in place: `(x - mean) / sqrt(var + eps) * weight + bias`, with the
    /// biased variance, as torch does.
    fn apply(&self, row: &mut [f32]) {
        let n = row.len() as f32;
        let mean = sum(row.iter().copied()) / n;
        let variance = sum(row.iter().map(|&x| (x - mean) * (x - mean))) / n;
        let inverse = 1.0 / (variance + self.eps).sqrt();
        for ((x, &w), &b) in row.iter_mut().zip(&self.weight).zip(&self.bias) {
            *x = (*x - mean) * inverse * w + b;
        }
    }
}

/// The sum of a row, in eight interleaved partial sums so the loop vectorises.
fn sum(values: impl Iterator<Item = f32>) -> f32 {
    let mut lanes = [0f32; 8];
    for (index, value) in values.enumerate() {
        lanes[index % 8] += value;
    }
    lanes.iter().sum()
}

/// Runs `f` over a contiguous f32 CPU tensor's values without copying them.
fn with_slice<R>(tensor: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = tensor.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        bail!("the MiniLM encoder runs on the CPU only");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("the MiniLM encoder expects contiguous tensors");
    };
    Ok(f(&cpu.as_slice::<f32>()?[start..end]))
}

/// A tensor's values, flattened.
fn to_vec(tensor: Tensor) -> Result<Vec<f32>> {
    tensor.flatten_all()?.to_vec1()
}

/// The tensors of `model.safetensors`, taken by name and checked for shape.
struct Weights {
    tensors: HashMap<String, Tensor>,
    eps: f32,
}

impl Weights {
    fn matrix(&self, name: &str, shape: (usize, usize)) -> Result<Tensor> {
        let Some(tensor) = self.tensors.get(name) else {
            bail!("model.safetensors has no tensor {name}");
        };
        if tensor.dims() != [shape.0, shape.1] {
            bail!("{name} has shape {:?}, expected {shape:?}", tensor.dims());
        }
        tensor.to_dtype(DType::F32)
    }

    fn vector(&self, name: &str, length: usize) -> Result<Vec<f32>> {
        let Some(tensor) = self.tensors.get(name) else {
            bail!("model.safetensors has no tensor {name}");
        };
        if tensor.dims() != [length] {
            bail!("{name} has shape {:?}, expected [{length}]", tensor.dims());
        }
        tensor.to_dtype(DType::F32)?.to_vec1()
    }

    /// The weights of `linears` side by side (their outputs concatenated), transposed.
    fn linear(&self, linears: &[&str], inputs: usize, outputs: usize) -> Result<Linear> {
        let mut weights = Vec::with_capacity(linears.len());
        let mut bias = Vec::with_capacity(linears.len() * outputs);
        for name in linears {
            weights.push(self.matrix(&format!("{name}.weight"), (outputs, inputs))?);
            bias.extend(self.vector(&format!("{name}.bias"), outputs)?);
        }
        Ok(Linear {
            weight: Tensor::cat(&weights, 0)?.t()?.contiguous()?,
            bias,
        })
    }

    fn layer_norm(&self, name: &str) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: self.vector(&format!("{name}.weight"), HIDDEN)?,
            bias: self.vector(&format!("{name}.bias"), HIDDEN)?,
            eps: self.eps,
        })
    }

    fn layer(&self, prefix: &str) -> Result<Layer> {
        let attention = format!("{prefix}.attention");
        Ok(Layer {
            qkv: self.linear(
                &[
                    &format!("{attention}.self.query"),
                    &format!("{attention}.self.key"),
                    &format!("{attention}.self.value"),
                ],
                HIDDEN,
                HIDDEN,
            )?,
            attention_output: self.linear(
                &[&format!("{attention}.output.dense")],
                HIDDEN,
                HIDDEN,
            )?,
            attention_norm: self.layer_norm(&format!("{attention}.output.LayerNorm"))?,
            intermediate: self.linear(
                &[&format!("{prefix}.intermediate.dense")],
                HIDDEN,
                INTERMEDIATE,
            )?,
            output: self.linear(&[&format!("{prefix}.output.dense")], INTERMEDIATE, HIDDEN)?,
            output_norm: self.layer_norm(&format!("{prefix}.output.LayerNorm"))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::erf;

    /// The approximation against libm's `erff` on every 64th f32 in [-5, 5], and on
    /// large and special values.
    #[test]
    fn erf_is_within_a_few_ulps_of_libm() {
        let mut worst = 0f32;
        let mut bits = 0u32;
        while bits < 0x40a0_0000 {
            for x in [f32::from_bits(bits), -f32::from_bits(bits)] {
                worst = worst.max((erf(x) - libm::erff(x)).abs());
            }
            bits += 64;
        }
        assert!(worst < 5e-7, "largest error {worst:e}");
        assert_eq!(erf(0.0), 0.0);
        assert!((erf(10.0) - 1.0).abs() < 1e-7);
        assert!((erf(-1e30) + 1.0).abs() < 1e-7);
        assert!((erf(f32::INFINITY) - 1.0).abs() < 1e-7);
    }
}
