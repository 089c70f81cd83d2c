//! DeepSeek sparse attention (DSA: deepseek_v32, glm_moe_dsa): the
//! "lightning indexer" that picks, for each query, the `index_topk` keys it
//! may attend to, and [`attend_selected`], attention over that selection.
//!
//! The indexer as transformers computes it (`DeepseekV32Indexer`,
//! `GlmMoeDsaIndexer`), on the layer's normalized input `x` and MLA's
//! normalized low-rank query `q_resid`:
//! - queries `wq_b(q_resid)`, `index_n_heads` heads of `index_head_dim`;
//!   one key per position, `LayerNorm(wk(x))` (with bias, eps 1e-6);
//!   rope on the first `qk_rope_head_dim` dims of each (half-split in
//!   DeepSeek-V3.2, interleaved in GLM-5), at the model's rope frequencies;
//! - `score[t] = sum_h w_h * relu(index_head_dim^-0.5 * q_h . k_t)` with
//!   `w = weights_proj(x) * index_n_heads^-0.5`;
//! - each query keeps the `index_topk` highest-scoring keys among those
//!   it may see (causal). While a query sees at most `index_topk` keys it
//!   keeps them all, which is plain causal attention.
//!
//! The indexer keys of every position are kept (in f32, [`IndexerKeys`]),
//! so a query's scores depend only on its position and the keys before
//! it, whether the sequence came in one call or many. Which of several
//! equal scores a query keeps (keys where every head's score is cut to 0
//! by the relu tie exactly) follows transformers on the CPU
//! ([`super::topk`]): like there, it is decided over the call's whole row
//! (this call's positions after the cached ones, later positions masked),
//! so only such ties can make a split sequence select differently.

use super::attention::AttnParams;
use super::config::JsonCfg;
use super::kv_cache::LayerKv;
use super::linear::{layer_name, matmul};
use super::rope::Rope;
use super::topk::torch_topk;
use crate::error::RuntimeError;
use crate::kernels;
use crate::weights::{Matrix, WeightSource};
use rayon::prelude::*;

/// LayerNorm epsilon of the indexer's key norm (fixed in the reference).
const K_NORM_EPS: f32 = 1e-6;

/// The indexer's shape and rope.
#[derive(Debug, Clone)]
pub struct Indexer {
    pub heads: usize,
    pub head_dim: usize,
    /// Keys each query keeps.
    pub topk: usize,
    /// Rope over the first `rotary_dim` dims of each head (and of the key).
    pub rope: Rope,
}

/// One layer's indexer weights (`self_attn.indexer.*`).
#[derive(Debug, Clone)]
pub struct IndexerWeights {
    /// `[heads * head_dim, q_lora_rank]`.
    pub wq_b: Matrix,
    /// `[head_dim, hidden]`.
    pub wk: Matrix,
    pub k_norm: Vec<f32>,
    pub k_norm_bias: Vec<f32>,
    /// `[heads, hidden]`.
    pub weights_proj: Matrix,
}

/// The indexer's key of every position so far, `[len, head_dim]`, f32:
/// the selection is a discrete choice, so its keys are not rounded.
#[derive(Debug, Clone, Default)]
pub struct IndexerKeys {
    head_dim: usize,
    keys: Vec<f32>,
}

impl IndexerKeys {
    pub fn new(head_dim: usize) -> Self {
        IndexerKeys {
            head_dim,
            keys: Vec::new(),
        }
    }

    /// Whether the layer has an indexer (a width-0 store stands for none).
    pub fn is_used(&self) -> bool {
        self.head_dim > 0
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.keys.len().checked_div(self.head_dim).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn truncate(&mut self, len: usize) {
        self.keys.truncate(len * self.head_dim);
    }

    pub fn clear(&mut self) {
        self.keys.clear();
    }

    pub fn bytes(&self) -> usize {
        self.keys.len() * 4
    }

    /// Appends the keys (`models::state`).
    pub fn save(&self, out: &mut Vec<u8>) {
        crate::models::state::put_u64(out, self.head_dim as u64);
        crate::models::state::put_f32s(out, &self.keys);
    }

    /// Replaces the keys with what [`IndexerKeys::save`] wrote for keys of this width.
    pub fn load(
        &mut self,
        r: &mut crate::models::state::StateReader<'_>,
    ) -> Result<(), crate::models::state::StateError> {
        crate::models::state::expect_eq("the indexer key width", r.usize()?, self.head_dim)?;
        let keys = r.f32s()?;
        if self.head_dim == 0 && !keys.is_empty()
            || self.head_dim > 0 && keys.len() % self.head_dim != 0
        {
            return Err(crate::models::state::StateError::Mismatch(format!(
                "{} indexer key values are not whole keys of width {}",
                keys.len(),
                self.head_dim
            )));
        }
        self.keys = keys;
        Ok(())
    }
}

impl Indexer {
    /// Reads `index_n_heads`, `index_head_dim` and `index_topk`; `rope` is
    /// the model's (MLA's) rope, applied here interleaved or not as the
    /// family says.
    pub fn from_cfg(c: &JsonCfg, rope: &Rope, interleave: bool) -> Result<Self, RuntimeError> {
        let head_dim = c.positive("index_head_dim")?;
        if rope.rotary_dim() > head_dim {
            return Err(c.bad(
                "index_head_dim",
                format!(
                    "{head_dim} is narrower than the rotary width qk_rope_head_dim = {}",
                    rope.rotary_dim()
                ),
            ));
        }
        Ok(Indexer {
            heads: c.positive("index_n_heads")?,
            head_dim,
            topk: c.positive("index_topk")?,
            rope: rope.clone().interleaved(interleave),
        })
    }

    /// Layer `l`'s indexer over `hidden` inputs and a `q_lora_rank` query.
    pub fn load(
        &self,
        src: &dyn WeightSource,
        l: usize,
        hidden: usize,
        q_lora_rank: usize,
    ) -> Result<IndexerWeights, RuntimeError> {
        let a = |n: &str| layer_name(l, &format!("self_attn.indexer.{n}"));
        Ok(IndexerWeights {
            wq_b: src.matrix(&a("wq_b"), self.heads * self.head_dim, q_lora_rank)?,
            wk: src.matrix(&a("wk"), self.head_dim, hidden)?,
            k_norm: src.vector(&a("k_norm.weight"), self.head_dim)?,
            k_norm_bias: src.vector(&a("k_norm.bias"), self.head_dim)?,
            weights_proj: src.matrix(&a("weights_proj"), self.heads, hidden)?,
        })
    }

    /// Appends the keys of `n` new positions (layer input `xn`, `[n,
    /// hidden]`) to `keys` and returns, for each of the `n` queries, the
    /// sorted key positions it attends to; `None` when every one of them
    /// sees at most `topk` keys (so keeps them all: causal attention).
    /// `q_resid`: MLA's normalized low-rank query, `[n, q_lora_rank]`.
    pub fn select(
        &self,
        w: &IndexerWeights,
        xn: &[f32],
        q_resid: &[f32],
        n: usize,
        keys: &mut IndexerKeys,
    ) -> Option<Vec<Vec<u32>>> {
        let (nh, d) = (self.heads, self.head_dim);
        let past = keys.len();
        let mut k = matmul(&w.wk, xn, n);
        for row in k.chunks_exact_mut(d) {
            layer_norm(row, &w.k_norm, &w.k_norm_bias, K_NORM_EPS);
        }
        self.rope.apply(&mut [k.as_mut_slice()], n, d, 0, past);
        keys.head_dim = d;
        keys.keys.extend_from_slice(&k);
        if past + n <= self.topk {
            return None;
        }
        let mut q = matmul(&w.wq_b, q_resid, n);
        self.rope.apply(&mut [q.as_mut_slice()], n, d, 0, past);
        let mut wts = matmul(&w.weights_proj, xn, n);
        let head_scale = (nh as f32).powf(-0.5);
        wts.iter_mut().for_each(|x| *x *= head_scale);
        let scale = (d as f32).powf(-0.5);
        let all = &keys.keys;
        let be = kernels::backend();
        let sel = (0..n)
            .into_par_iter()
            .map(|i| {
                let ctx = past + i + 1;
                if ctx <= self.topk {
                    return (0..ctx as u32).collect();
                }
                let qi = &q[i * nh * d..(i + 1) * nh * d];
                let wi = &wts[i * nh..(i + 1) * nh];
                // The row transformers' top-k searches: every position of
                // this call, those after the query masked to -inf.
                let mut row = vec![f32::NEG_INFINITY; past + n];
                for (s, kt) in row.iter_mut().zip(all[..ctx * d].chunks_exact(d)) {
                    *s = qi
                        .chunks_exact(d)
                        .zip(wi)
                        .map(|(qh, wh)| wh * (be.dot(qh, kt) * scale).max(0.0))
                        .sum();
                }
                torch_topk(&row, self.topk)
                    .into_iter()
                    .filter(|&j| (j as usize) < ctx)
                    .collect()
            })
            .collect();
        Some(sel)
    }
}

/// Refuses configs whose layers are not all "indexed attention" with their
/// own indexer: `layer_types` other than `indexed_attention`, and, where
/// the family has cross-layer top-k sharing (`sharing`, GLM-5), a layer
/// that reuses the previous layer's selection (`indexer_types: "shared"`,
/// or what transformers derives from the older `index_topk_pattern` /
/// `index_topk_freq` / `index_skip_topk_offset`).
pub fn check_layer_types(c: &JsonCfg, sharing: bool) -> Result<(), RuntimeError> {
    use serde_json::Value;
    let n_layers = c.positive("num_hidden_layers")?;
    let strings = |key: &str| -> Result<Option<Vec<String>>, RuntimeError> {
        match c.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(a)) if a.len() == n_layers => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| c.bad(key, format!("expected strings, found {v}")))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(v) => Err(c.bad(
                key,
                format!("expected a list of {n_layers} strings, found {v}"),
            )),
        }
    };
    if let Some(t) = strings("layer_types")? {
        if let Some(bad) = t.iter().find(|t| *t != "indexed_attention") {
            return Err(c.bad(
                "layer_types",
                format!("layer type `{bad}` is not supported (only indexed_attention)"),
            ));
        }
    }
    if !sharing {
        return Ok(());
    }
    let (key, shared) = if let Some(t) = strings("indexer_types")? {
        if let Some(bad) = t.iter().find(|t| *t != "full" && *t != "shared") {
            return Err(c.bad(
                "indexer_types",
                format!("expected \"full\" or \"shared\", found `{bad}`"),
            ));
        }
        ("indexer_types", t.iter().any(|t| t == "shared"))
    } else if let Some(p) = c.obj.get("index_topk_pattern").filter(|v| !v.is_null()) {
        let shared = match p {
            Value::String(s) => s.contains('S'),
            Value::Array(a) => a.iter().any(|v| v.as_str() == Some("shared")),
            _ => return Err(c.bad("index_topk_pattern", "expected a string or a list")),
        };
        ("index_topk_pattern", shared)
    } else {
        // transformers: layer i is full when max(i - offset + 1, 0) % freq == 0.
        let freq = c.usize_opt("index_topk_freq")?.unwrap_or(1).max(1);
        let offset = c.usize_opt("index_skip_topk_offset")?.unwrap_or(2);
        let shared = (0..n_layers).any(|i| (i + 1).saturating_sub(offset) % freq != 0);
        ("index_topk_freq", shared)
    };
    if shared {
        return Err(c.bad(
            key,
            "layers that reuse the previous layer's top-k selection (\"shared\" indexer layers) are not supported; every layer must run its own indexer",
        ));
    }
    Ok(())
}

/// `LayerNorm` with weight and bias (biased variance), in place.
fn layer_norm(x: &mut [f32], w: &[f32], b: &[f32], eps: f32) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    let inv = 1.0 / (var + eps).sqrt();
    for ((v, w), b) in x.iter_mut().zip(w).zip(b) {
        *v = (*v - mean) * inv * w + b;
    }
}

/// Attention of `n` new queries (`q`: `[n, heads * head_dim]`) over only
/// the key positions `sel[i]` selected for query `i` (cached positions
/// from `kv`, this call's own from `k_new`/`v_new`, `[n, kv_heads *
/// head_dim]`, not yet appended). Returns `[n, heads * head_dim]`.
///
/// Why not [`super::attention::attend`] with a mask: it reads every cached
/// position per query, where DSA's point is that a query reads only its
/// `index_topk` keys, so this gathers them.
pub fn attend_selected(
    p: &AttnParams,
    q: &[f32],
    k_new: &[f32],
    v_new: &[f32],
    kv: &LayerKv,
    n: usize,
    sel: &[Vec<u32>],
) -> Vec<f32> {
    let (heads, hd) = (p.heads, p.head_dim);
    let (qd, kd) = (heads * hd, p.kv_heads * hd);
    let group = heads / p.kv_heads;
    debug_assert_eq!(q.len(), n * qd);
    debug_assert_eq!(sel.len(), n);
    let past = kv.len();
    let be = kernels::backend();
    let mut out = vec![0.0; n * qd];
    out.par_chunks_mut(hd).enumerate().for_each_init(
        Vec::new,
        |scores: &mut Vec<f32>, (idx, o)| {
            let (i, h) = (idx / heads, idx % heads);
            let kh = h / group;
            let qh = &q[i * qd + h * hd..i * qd + (h + 1) * hd];
            let row = |j: usize| (j - past) * kd + kh * hd..(j - past) * kd + (kh + 1) * hd;
            scores.clear();
            scores.extend(sel[i].iter().map(|&j| {
                let j = j as usize;
                if j < past {
                    kv.key_dot(j, kh, qh)
                } else {
                    be.dot(qh, &k_new[row(j)])
                }
            }));
            be.softmax_scaled(scores, p.scale);
            o.fill(0.0);
            for (&j, &pj) in sel[i].iter().zip(scores.iter()) {
                let j = j as usize;
                if j < past {
                    kv.value_axpy(j, kh, pj, o);
                } else {
                    be.axpy(pj, &v_new[row(j)], o);
                }
            }
        },
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::weights::{Blob, DType};

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    fn mat(rows: usize, cols: usize, seed: u64) -> Matrix {
        let bytes: Vec<u8> = rand(rows * cols, seed)
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        Matrix::dense(DType::F32, rows, cols, Blob::copy_of(&bytes)).unwrap()
    }

    /// The selection of a sequence fed in pieces (a prompt within
    /// `index_topk`, a longer chunk, then one position at a time) is the
    /// one-pass selection: keys of earlier calls are kept, positions are
    /// rotated at their place. With 8 indexer heads exact ties (every
    /// head's score cut to 0 for two keys at the cut) do not occur here,
    /// which the test checks rather than assumes.
    #[test]
    fn selection_over_a_growing_cache_equals_one_pass() {
        let (hidden, qr, heads, d, topk, len) = (32, 24, 8, 16, 6, 30);
        let ix = Indexer {
            heads,
            head_dim: d,
            topk,
            rope: Rope::new(10000.0, 8),
        };
        let w = IndexerWeights {
            wq_b: mat(heads * d, qr, 1),
            wk: mat(d, hidden, 2),
            k_norm: rand(d, 3).iter().map(|v| 1.0 + 0.5 * v).collect(),
            k_norm_bias: rand(d, 4).iter().map(|v| 0.2 * v).collect(),
            weights_proj: mat(heads, hidden, 5),
        };
        let (xn, q_resid) = (rand(len * hidden, 6), rand(len * qr, 7));
        let mut keys = IndexerKeys::new(d);
        let whole = ix.select(&w, &xn, &q_resid, len, &mut keys).unwrap();
        assert_eq!(keys.len(), len);

        let mut split_keys = IndexerKeys::new(d);
        let mut split: Vec<Vec<u32>> = Vec::new();
        let mut at = 0;
        for step in [4, 7].into_iter().chain(std::iter::repeat(1)) {
            if at == len {
                break;
            }
            let m = step.min(len - at);
            let xs = &xn[at * hidden..(at + m) * hidden];
            let qs = &q_resid[at * qr..(at + m) * qr];
            match ix.select(&w, xs, qs, m, &mut split_keys) {
                None => split.extend((at..at + m).map(|i| (0..=i as u32).collect())),
                Some(s) => split.extend(s),
            }
            at += m;
        }
        for (a, b) in split_keys.keys.iter().zip(&keys.keys) {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
        }
        assert_eq!(split, whole);
        // Not vacuous: later queries keep topk keys, and not simply the
        // most recent ones.
        assert!(whole[topk..].iter().all(|s| s.len() == topk));
        assert!(whole[topk..]
            .iter()
            .enumerate()
            .any(|(i, s)| s[0] as usize != i + 1));
    }

    #[test]
    fn layer_norm_centres_and_scales() {
        let mut x = [1.0, 2.0, 3.0, 6.0];
        layer_norm(&mut x, &[1.0; 4], &[0.5; 4], 0.0);
        let mean: f32 = x.iter().sum::<f32>() / 4.0;
        let var: f32 = x.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 4.0;
        assert!(
            (mean - 0.5).abs() < 1e-6 && (var - 1.0).abs() < 1e-5,
            "{x:?}"
        );
    }
}
