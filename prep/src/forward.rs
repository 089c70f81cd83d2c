//! The calibration forward pass: one layer at a time over the *whole*
//! calibration batch (load layer L, push every token through it, drop it),
//! so peak memory is one layer's dense weights + one expert + activations,
//! whatever the model's size. This is a different loop order from the
//! runtime's token-by-token decode, which is why prep has its own small
//! forward instead of borrowing the runtime's: the runtime keeps all layers
//! mapped and walks tokens; prep keeps all tokens and walks layers.
//!
//! Implemented family: `qwen3_moe` (Qwen3-MoE: GQA attention with per-head
//! q/k RMSNorm and NeoX RoPE, softmax top-k router, SwiGLU experts). Math is
//! f32 throughout, like the transformers reference in ../shared.

use crate::checkpoint::{Checkpoint, Mat};
use crate::config::{ModelConfig, PROFILED_ARCHS};
use crate::error::{PrepError, Result};
use rayon::prelude::*;
use std::sync::Arc;

/// Token activations for `rows` independent sequences of `seq` tokens.
pub struct Batch {
    pub rows: usize,
    pub seq: usize,
    pub hidden: usize,
    /// `[rows * seq, hidden]`.
    pub x: Vec<f32>,
}

/// The routing decisions of one MoE layer for every token of the batch.
pub struct Routing {
    pub top_k: usize,
    /// `[tokens * top_k]` expert ids, in the router's top-k order.
    pub ids: Vec<u32>,
    /// `[tokens * top_k]` gate weights (renormalized if the model does).
    pub weights: Vec<f32>,
}

/// The three projections of one SwiGLU expert.
#[derive(Debug)]
pub struct ExpertWeights {
    pub gate: Mat,
    pub up: Mat,
    pub down: Mat,
}

/// Supplies expert weights for the layer being run. Prep passes the
/// checkpoint's experts; the merge stage passes merged ones.
pub trait ExpertSource: Sync {
    /// Weights of expert `e` in `layer`; `e` is after any id remapping.
    fn expert(&self, layer: usize, e: usize) -> Result<Arc<ExpertWeights>>;
    /// Maps the router's original id to the stored expert (identity unless merged).
    fn remap(&self, _layer: usize, e: usize) -> usize {
        e
    }
}

/// Experts read straight from the checkpoint.
pub struct CheckpointExperts<'a>(pub &'a Checkpoint);

impl ExpertSource for CheckpointExperts<'_> {
    fn expert(&self, layer: usize, e: usize) -> Result<Arc<ExpertWeights>> {
        load_expert(self.0, layer, e)
    }
}

pub fn load_expert(ck: &Checkpoint, layer: usize, e: usize) -> Result<Arc<ExpertWeights>> {
    let c = &ck.config;
    let gate = ck.expert(layer, e, "gate")?;
    let up = ck.expert(layer, e, "up")?;
    let down = ck.expert(layer, e, "down")?;
    let bad = |p: &str, m: &Mat, r: usize, cc: usize| -> Result<()> {
        if m.rows != r || m.cols != cc {
            return Err(PrepError::Tensor {
                name: format!("model.layers.{layer} expert {e} {p}_proj"),
                msg: format!("shape [{}, {}], expected [{r}, {cc}]", m.rows, m.cols),
            });
        }
        Ok(())
    };
    bad("gate", &gate, c.moe_inter, c.hidden)?;
    bad("up", &up, c.moe_inter, c.hidden)?;
    bad("down", &down, c.hidden, c.moe_inter)?;
    Ok(Arc::new(ExpertWeights { gate, up, down }))
}

pub fn check_supported(c: &ModelConfig) -> Result<()> {
    if !PROFILED_ARCHS.contains(&c.model_type.as_str()) {
        return Err(PrepError::Unsupported(format!(
            "model_type {:?}: mfx prep supports {} checkpoints",
            c.model_type,
            PROFILED_ARCHS.join(", ")
        )));
    }
    if !c.dense_layers.is_empty() {
        return Err(PrepError::Unsupported(format!(
            "{}: dense MLP layers {:?} (mlp_only_layers) are not implemented in prep yet",
            c.model_type, c.dense_layers
        )));
    }
    if c.heads % c.kv_heads.max(1) != 0 || c.head_dim % 2 != 0 {
        return Err(PrepError::Unsupported(format!(
            "{} attention heads / {} kv heads / head_dim {}",
            c.heads, c.kv_heads, c.head_dim
        )));
    }
    Ok(())
}

/// `a . b` with 8 independent accumulators so the compiler vectorizes it.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for j in 0..8 {
            acc[j] += x[j] * y[j];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// `y[n, w.rows] = x[n, w.cols] @ w^T`, parallel over blocks of x rows.
pub fn matmul(w: &Mat, x: &[f32], n: usize) -> Vec<f32> {
    let (m, k) = (w.rows, w.cols);
    debug_assert_eq!(x.len(), n * k);
    let mut y = vec![0f32; n * m];
    const BLOCK: usize = 16;
    y.par_chunks_mut(BLOCK * m)
        .enumerate()
        .for_each(|(bi, yb)| {
            let r0 = bi * BLOCK;
            let nb = yb.len() / m;
            for (r, wr) in w.data.chunks_exact(k).enumerate() {
                for i in 0..nb {
                    yb[i * m + r] = dot(wr, &x[(r0 + i) * k..(r0 + i + 1) * k]);
                }
            }
        });
    y
}

pub fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let d = w.len();
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(d * 64)
        .zip(x.par_chunks(d * 64))
        .for_each(|(o, xi)| {
            for (orow, xrow) in o.chunks_exact_mut(d).zip(xi.chunks_exact(d)) {
                let ss = xrow.iter().map(|v| v * v).sum::<f32>() / d as f32;
                let inv = 1.0 / (ss + eps).sqrt();
                for ((o, v), g) in orow.iter_mut().zip(xrow).zip(w) {
                    *o = v * inv * g;
                }
            }
        });
    out
}

/// Dense (non-expert) weights of one layer.
pub struct LayerWeights {
    pub ln1: Vec<f32>,
    pub ln2: Vec<f32>,
    pub q: Mat,
    pub k: Mat,
    pub v: Mat,
    pub o: Mat,
    pub q_norm: Vec<f32>,
    pub k_norm: Vec<f32>,
    pub router: Mat,
}

impl LayerWeights {
    pub fn load(ck: &Checkpoint, l: usize) -> Result<Self> {
        let c = &ck.config;
        let p = format!("model.layers.{l}");
        let (h, d) = (c.hidden, c.head_dim);
        Ok(Self {
            ln1: ck.vector(&format!("{p}.input_layernorm.weight"), h)?,
            ln2: ck.vector(&format!("{p}.post_attention_layernorm.weight"), h)?,
            q: ck.matrix_shaped(&format!("{p}.self_attn.q_proj"), c.heads * d, h)?,
            k: ck.matrix_shaped(&format!("{p}.self_attn.k_proj"), c.kv_heads * d, h)?,
            v: ck.matrix_shaped(&format!("{p}.self_attn.v_proj"), c.kv_heads * d, h)?,
            o: ck.matrix_shaped(&format!("{p}.self_attn.o_proj"), h, c.heads * d)?,
            q_norm: ck.vector(&format!("{p}.self_attn.q_norm.weight"), d)?,
            k_norm: ck.vector(&format!("{p}.self_attn.k_norm.weight"), d)?,
            router: ck.matrix_shaped(&format!("{p}.mlp.gate"), c.experts, h)?,
        })
    }
}

/// Embeds `rows` of token ids (`[rows * seq]`).
pub fn embed(ck: &Checkpoint, ids: &[u32], rows: usize, seq: usize) -> Result<Batch> {
    let c = &ck.config;
    let emb = ck.matrix_shaped("model.embed_tokens", c.vocab, c.hidden)?;
    let mut x = vec![0f32; ids.len() * c.hidden];
    for (t, &id) in ids.iter().enumerate() {
        let id = id as usize;
        if id >= c.vocab {
            return Err(PrepError::Calibration(format!(
                "token id {id} >= vocab_size {}",
                c.vocab
            )));
        }
        x[t * c.hidden..(t + 1) * c.hidden]
            .copy_from_slice(&emb.data[id * c.hidden..(id + 1) * c.hidden]);
    }
    Ok(Batch {
        rows,
        seq,
        hidden: c.hidden,
        x,
    })
}

fn rope_tables(seq: usize, d: usize, theta: f64) -> (Vec<f32>, Vec<f32>) {
    let half = d / 2;
    let mut cos = vec![0f32; seq * half];
    let mut sin = vec![0f32; seq * half];
    for p in 0..seq {
        for i in 0..half {
            let inv = 1.0 / (theta as f32).powf(2.0 * i as f32 / d as f32);
            let a = p as f32 * inv;
            cos[p * half + i] = a.cos();
            sin[p * half + i] = a.sin();
        }
    }
    (cos, sin)
}

/// Per-head RMSNorm then NeoX rotary embedding, in place on `[n, heads*d]`.
fn norm_rope(
    x: &mut [f32],
    heads: usize,
    d: usize,
    seq: usize,
    w: &[f32],
    eps: f32,
    cos: &[f32],
    sin: &[f32],
) {
    let half = d / 2;
    x.par_chunks_mut(heads * d)
        .enumerate()
        .for_each(|(t, row)| {
            let p = t % seq;
            for hv in row.chunks_exact_mut(d) {
                let ss = hv.iter().map(|v| v * v).sum::<f32>() / d as f32;
                let inv = 1.0 / (ss + eps).sqrt();
                for (v, g) in hv.iter_mut().zip(w) {
                    *v = *v * inv * g;
                }
                for i in 0..half {
                    let (a, b) = (hv[i], hv[i + half]);
                    let (c, s) = (cos[p * half + i], sin[p * half + i]);
                    hv[i] = a * c - b * s;
                    hv[i + half] = b * c + a * s;
                }
            }
        });
}

/// Causal GQA attention over each row independently; returns `[n, heads*d]`.
fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    rows: usize,
    seq: usize,
    heads: usize,
    kvh: usize,
    d: usize,
) -> Vec<f32> {
    let qd = heads * d;
    let kd = kvh * d;
    let group = heads / kvh;
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0f32; rows * seq * qd];
    out.par_chunks_mut(seq * qd)
        .enumerate()
        .for_each(|(r, orow)| {
            let base = r * seq;
            let mut scores = vec![0f32; seq];
            for t in 0..seq {
                for h in 0..heads {
                    let kh = h / group;
                    let qv = &q[(base + t) * qd + h * d..(base + t) * qd + (h + 1) * d];
                    let mut m = f32::NEG_INFINITY;
                    for s in 0..=t {
                        let kv = &k[(base + s) * kd + kh * d..(base + s) * kd + (kh + 1) * d];
                        let sc = dot(qv, kv) * scale;
                        scores[s] = sc;
                        m = m.max(sc);
                    }
                    let mut z = 0f32;
                    for sc in &mut scores[..=t] {
                        *sc = (*sc - m).exp();
                        z += *sc;
                    }
                    let o = &mut orow[t * qd + h * d..t * qd + (h + 1) * d];
                    for s in 0..=t {
                        let p = scores[s] / z;
                        let vv = &v[(base + s) * kd + kh * d..(base + s) * kd + (kh + 1) * d];
                        for (oi, vi) in o.iter_mut().zip(vv) {
                            *oi += p * vi;
                        }
                    }
                }
            }
        });
    out
}

/// Top-k of a softmax router, ties broken by lower id (torch.topk picks the
/// lower index for equal values on CPU in practice).
pub fn route(logits: &[f32], e: usize, k: usize, norm_topk: bool) -> (Vec<u32>, Vec<f32>) {
    let n = logits.len() / e;
    let mut ids = vec![0u32; n * k];
    let mut ws = vec![0f32; n * k];
    ids.par_chunks_mut(k)
        .zip(ws.par_chunks_mut(k))
        .enumerate()
        .for_each(|(t, (id, w))| {
            let l = &logits[t * e..(t + 1) * e];
            let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let p: Vec<f32> = l.iter().map(|v| (v - m).exp()).collect();
            let z: f32 = p.iter().sum();
            let mut order: Vec<usize> = (0..e).collect();
            order.sort_by(|&a, &b| l[b].total_cmp(&l[a]).then(a.cmp(&b)));
            let mut s = 0f32;
            for j in 0..k {
                id[j] = order[j] as u32;
                w[j] = p[order[j]] / z;
                s += w[j];
            }
            if norm_topk && s > 0.0 {
                for x in w.iter_mut() {
                    *x /= s;
                }
            }
        });
    (ids, ws)
}

/// Runs one decoder layer over the whole batch, in place; returns its routing.
pub fn layer_forward(
    c: &ModelConfig,
    layer: usize,
    lw: &LayerWeights,
    experts: &dyn ExpertSource,
    b: &mut Batch,
) -> Result<Routing> {
    let n = b.rows * b.seq;
    let (h, d) = (c.hidden, c.head_dim);
    let xn = rms_norm_rows(&b.x, &lw.ln1, c.rms_eps);
    let mut q = matmul(&lw.q, &xn, n);
    let mut k = matmul(&lw.k, &xn, n);
    let v = matmul(&lw.v, &xn, n);
    drop(xn);
    let (cos, sin) = rope_tables(b.seq, d, c.rope_theta);
    norm_rope(&mut q, c.heads, d, b.seq, &lw.q_norm, c.rms_eps, &cos, &sin);
    norm_rope(
        &mut k, c.kv_heads, d, b.seq, &lw.k_norm, c.rms_eps, &cos, &sin,
    );
    let att = attention(&q, &k, &v, b.rows, b.seq, c.heads, c.kv_heads, d);
    drop((q, k, v));
    let o = matmul(&lw.o, &att, n);
    drop(att);
    for (x, y) in b.x.iter_mut().zip(&o) {
        *x += y;
    }
    drop(o);
    let xn = rms_norm_rows(&b.x, &lw.ln2, c.rms_eps);
    let logits = matmul(&lw.router, &xn, n);
    let (ids, weights) = route(&logits, c.experts, c.top_k, c.norm_topk_prob);
    drop(logits);
    // Tokens per stored expert (after remapping merged ids), in token order.
    let ne = c.experts;
    let mut assign: Vec<Vec<(u32, f32)>> = vec![Vec::new(); ne];
    for t in 0..n {
        for j in 0..c.top_k {
            let e = experts.remap(layer, ids[t * c.top_k + j] as usize);
            if e >= ne {
                return Err(PrepError::Merge(format!(
                    "layer {layer}: expert map points at {e} >= {ne}"
                )));
            }
            assign[e].push((t as u32, weights[t * c.top_k + j]));
        }
    }
    // Experts in fixed-size groups, in id order, so results are deterministic
    // and only a few experts' weights are alive at once.
    let group = rayon::current_num_threads().max(1) * 2;
    let mut e0 = 0;
    while e0 < ne {
        let e1 = (e0 + group).min(ne);
        let outs: Vec<Result<Option<Vec<f32>>>> = (e0..e1)
            .into_par_iter()
            .map(|e| {
                let toks = &assign[e];
                if toks.is_empty() {
                    return Ok(None);
                }
                let w = experts.expert(layer, e)?;
                let mut xs = Vec::with_capacity(toks.len() * h);
                for &(t, _) in toks {
                    xs.extend_from_slice(&xn[t as usize * h..(t as usize + 1) * h]);
                }
                let mut g = matmul(&w.gate, &xs, toks.len());
                let u = matmul(&w.up, &xs, toks.len());
                for (gi, ui) in g.iter_mut().zip(&u) {
                    *gi = *gi / (1.0 + (-*gi).exp()) * ui;
                }
                Ok(Some(matmul(&w.down, &g, toks.len())))
            })
            .collect();
        for (e, out) in (e0..e1).zip(outs) {
            if let Some(y) = out? {
                for (i, &(t, wt)) in assign[e].iter().enumerate() {
                    let dst = &mut b.x[t as usize * h..(t as usize + 1) * h];
                    for (dv, yv) in dst.iter_mut().zip(&y[i * h..(i + 1) * h]) {
                        *dv += wt * yv;
                    }
                }
            }
        }
        e0 = e1;
    }
    Ok(Routing {
        top_k: c.top_k,
        ids,
        weights,
    })
}

/// Mean next-token NLL (nats) of each row's 511 predictions, averaged over
/// rows: the protocol of ../shared's reference `val_nll`.
pub fn final_nll(ck: &Checkpoint, b: &Batch, ids: &[u32]) -> Result<f64> {
    let c = &ck.config;
    let norm = ck.vector("model.norm.weight", c.hidden)?;
    let head_name = if c.tie_embeddings || !ck.has("lm_head.weight") {
        "model.embed_tokens"
    } else {
        "lm_head"
    };
    let head = ck.matrix_shaped(head_name, c.vocab, c.hidden)?;
    let xn = rms_norm_rows(&b.x, &norm, c.rms_eps);
    let mut total = 0f64;
    let mut count = 0usize;
    for r in 0..b.rows {
        let base = r * b.seq;
        let logits = matmul(
            &head,
            &xn[base * c.hidden..(base + b.seq) * c.hidden],
            b.seq,
        );
        for t in 0..b.seq.saturating_sub(1) {
            let l = &logits[t * c.vocab..(t + 1) * c.vocab];
            let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let z: f64 = l.iter().map(|v| ((v - m) as f64).exp()).sum();
            let target = ids[base + t + 1] as usize;
            total += z.ln() + m as f64 - l[target] as f64;
            count += 1;
        }
    }
    Ok(if count == 0 {
        f64::NAN
    } else {
        total / count as f64
    })
}
