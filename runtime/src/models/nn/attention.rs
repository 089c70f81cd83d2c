//! The one attention: causal grouped-query attention over a head-major KV
//! cache ([`attend`], the kernel path every family uses, MLA after its
//! projection and qwen3_next's full-attention layers included), and the
//! standard GQA block around it ([`gqa`]: q/k/v projections with optional
//! bias, clip and q/k norm, rope, `attend`, o_proj) that the shared decoder
//! and glm4_moe run.
//!
//! Keys and values of the tokens being processed are used at full f32
//! precision for attention within this call and only rounded to the cache's
//! storage precision when stored; earlier positions come from the cache.
//! For a one-shot forward (logits, perplexity) this makes the result exactly
//! the f32 computation transformers does.

use super::kv_cache::LayerKv;
use super::linear::{layer_name, norm_in_place};
use super::rope::Rope;
use crate::error::RuntimeError;
use crate::kernels;
use crate::weights::{Matrix, WeightSource};
use rayon::prelude::*;

/// Where (if anywhere) a family normalizes queries and keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    None,
    /// Qwen3: RMSNorm over each head (`head_dim` weights).
    PerHead,
    /// OLMoE: RMSNorm over the whole projection (`heads * head_dim` weights).
    Full,
}

/// Shape parameters shared by every attention layer of a model.
#[derive(Debug, Clone)]
pub struct AttnShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub eps: f32,
    pub qk_norm: QkNorm,
    pub clip_qkv: Option<f32>,
}

/// One layer's attention weights.
#[derive(Debug, Clone)]
pub struct AttnWeights {
    pub q: Matrix,
    pub k: Matrix,
    pub v: Matrix,
    pub o: Matrix,
    pub q_bias: Option<Vec<f32>>,
    pub k_bias: Option<Vec<f32>>,
    pub v_bias: Option<Vec<f32>>,
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
}

impl AttnWeights {
    /// Layer `l`'s `self_attn.{q,k,v,o}_proj` for shape `s` over `hidden`
    /// inputs, with q/k/v biases when `bias`, and q/k norm weights as
    /// `s.qk_norm` says.
    pub fn load(
        src: &dyn WeightSource,
        l: usize,
        s: &AttnShape,
        hidden: usize,
        bias: bool,
    ) -> Result<Self, RuntimeError> {
        let (qd, kd) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
        let a = |n: &str| layer_name(l, &format!("self_attn.{n}"));
        let b = |n: &str, len: usize| -> Result<Option<Vec<f32>>, RuntimeError> {
            if bias {
                src.vector(&a(&format!("{n}.bias")), len).map(Some)
            } else {
                Ok(None)
            }
        };
        let (qn_len, kn_len) = match s.qk_norm {
            QkNorm::None => (0, 0),
            QkNorm::PerHead => (s.head_dim, s.head_dim),
            QkNorm::Full => (qd, kd),
        };
        let (q_norm, k_norm) = if qn_len > 0 {
            (
                Some(src.vector(&a("q_norm.weight"), qn_len)?),
                Some(src.vector(&a("k_norm.weight"), kn_len)?),
            )
        } else {
            (None, None)
        };
        Ok(AttnWeights {
            q: src.matrix(&a("q_proj"), qd, hidden)?,
            k: src.matrix(&a("k_proj"), kd, hidden)?,
            v: src.matrix(&a("v_proj"), kd, hidden)?,
            o: src.matrix(&a("o_proj"), hidden, qd)?,
            q_bias: b("q_proj", qd)?,
            k_bias: b("k_proj", kd)?,
            v_bias: b("v_proj", kd)?,
            q_norm,
            k_norm,
        })
    }
}

/// q, k and v in one shared-input product (x quantized once where the
/// kernels do that), then each one's bias and clip.
fn project_qkv(w: &AttnWeights, x: &[f32], n: usize, clip: Option<f32>) -> [Vec<f32>; 3] {
    let mut q = vec![0.0; n * w.q.rows()];
    let mut k = vec![0.0; n * w.k.rows()];
    let mut v = vec![0.0; n * w.v.rows()];
    kernels::matmul_many(
        &[w.q.mat(), w.k.mat(), w.v.mat()],
        x,
        n,
        &mut [&mut q, &mut k, &mut v],
    );
    for (y, bias) in [
        (&mut q, &w.q_bias),
        (&mut k, &w.k_bias),
        (&mut v, &w.v_bias),
    ] {
        if let Some(b) = bias {
            for row in y.chunks_exact_mut(b.len()) {
                for (a, c) in row.iter_mut().zip(b) {
                    *a += c;
                }
            }
        }
        if let Some(c) = clip {
            for a in y.iter_mut() {
                *a = a.clamp(-c, c);
            }
        }
    }
    [q, k, v]
}

/// The GQA block over `n` new tokens whose normalized hidden states are
/// `xn` (`[n, hidden]`), at positions `kv.len()..kv.len()+n`. Appends their
/// keys and values to `kv` and returns the attention output after `o_proj`
/// (`[n, hidden]`).
pub fn gqa(
    s: &AttnShape,
    w: &AttnWeights,
    rope: &Rope,
    xn: &[f32],
    n: usize,
    kv: &mut LayerKv,
) -> Vec<f32> {
    let p = AttnParams::new(s.heads, s.kv_heads, s.head_dim);
    gqa_with(s, w, rope, &p, xn, n, kv)
}

/// [`gqa`] with explicit attention parameters (a sliding window, sinks).
pub fn gqa_with(
    s: &AttnShape,
    w: &AttnWeights,
    rope: &Rope,
    p: &AttnParams<'_>,
    xn: &[f32],
    n: usize,
    kv: &mut LayerKv,
) -> Vec<f32> {
    let (hd, nh, nkv) = (s.head_dim, s.heads, s.kv_heads);
    let (qd, kd) = (nh * hd, nkv * hd);
    let [mut q, mut k, v] = project_qkv(w, xn, n, s.clip_qkv);
    match s.qk_norm {
        QkNorm::None => {}
        QkNorm::PerHead => {
            if let (Some(qn), Some(kn)) = (&w.q_norm, &w.k_norm) {
                norm_in_place(&mut q, hd, qn, s.eps);
                norm_in_place(&mut k, hd, kn, s.eps);
            }
        }
        QkNorm::Full => {
            if let (Some(qn), Some(kn)) = (&w.q_norm, &w.k_norm) {
                norm_in_place(&mut q, qd, qn, s.eps);
                norm_in_place(&mut k, kd, kn, s.eps);
            }
        }
    }
    rope.apply(
        &mut [q.as_mut_slice(), k.as_mut_slice()],
        n,
        hd,
        0,
        kv.len(),
    );
    let out = attend(p, &q, &k, &v, kv, n);
    let mut y = vec![0.0; n * w.o.rows()];
    kernels::matmul(&w.o.mat(), &out, n, &mut y);
    y
}

/// Query heads per attention task: the largest divisor of the GQA `group`
/// that still leaves at least one task per thread (`tasks` = tokens x
/// heads at one head per task). Whole groups read the KV cache least;
/// smaller runs keep every core busy when there are few KV heads.
fn heads_per_task(group: usize, tasks: usize, threads: usize) -> usize {
    (1..=group.max(1))
        .rev()
        .find(|&s| group.is_multiple_of(s) && tasks / s >= threads)
        .unwrap_or(1)
}

/// What [`attend`] needs besides the tensors, including gpt-oss's two
/// additions: a sliding window and per-head attention sinks.
#[derive(Debug, Clone, Copy)]
pub struct AttnParams<'a> {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Scores are `scale * q.k` (usually `head_dim^-0.5`).
    pub scale: f32,
    /// A query at position `p` sees keys `p - window + 1 ..= p` (`window`
    /// keys including its own), as transformers' sliding-window mask
    /// (`kv_idx > q_idx - sliding_window`); `None`: every earlier key.
    pub window: Option<usize>,
    /// One logit per query head that joins the softmax's denominator and
    /// nothing else (gpt-oss's `sinks`): the weights are
    /// `exp(s_j) / (sum_j exp(s_j) + exp(sink))`, the sink unscaled.
    pub sinks: Option<&'a [f32]>,
}

impl AttnParams<'static> {
    /// `head_dim^-0.5` scaling, full causal attention, no sinks.
    pub fn new(heads: usize, kv_heads: usize, head_dim: usize) -> Self {
        AttnParams {
            heads,
            kv_heads,
            head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
            window: None,
            sinks: None,
        }
    }
}

impl<'a> AttnParams<'a> {
    /// These parameters with a sliding window of `window` keys (`None`: full).
    pub fn windowed(self, window: Option<usize>) -> Self {
        AttnParams { window, ..self }
    }

    /// These parameters with per-head attention sinks (`heads` logits).
    pub fn with_sinks<'b>(self, sinks: &'b [f32]) -> AttnParams<'b> {
        debug_assert_eq!(sinks.len(), self.heads);
        AttnParams {
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            scale: self.scale,
            window: self.window,
            sinks: Some(sinks),
        }
    }

    /// The first key position a query at `pos` sees.
    fn first_key(&self, pos: usize) -> usize {
        self.window
            .map_or(0, |w| (pos + 1).saturating_sub(w.max(1)))
    }
}

/// `softmax(scale * x)` over one head's scores, in place, with `sink` (if
/// any) as one more logit in the denominator. With a sink the backend's
/// softmax is used as is and rescaled: it gives `exp(z_j - m) / S` (`m` the
/// largest scaled score, `S` the sum), whose largest entry is `1 / S`, so
/// multiplying by `S / (S + exp(sink - m))` adds the sink's term.
fn softmax_with_sink(be: &dyn kernels::Backend, x: &mut [f32], scale: f32, sink: Option<f32>) {
    let Some(sink) = sink else {
        be.softmax_scaled(x, scale);
        return;
    };
    let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b * scale));
    be.softmax_scaled(x, scale);
    if m == f32::NEG_INFINITY {
        return;
    }
    let top = x.iter().fold(0.0f32, |a, &b| a.max(b));
    let r = 1.0 / (1.0 + (sink - m).exp() * top);
    for v in x.iter_mut() {
        *v *= r;
    }
}

/// Causal grouped-query attention of `n` new queries (`q`: `[n, heads *
/// head_dim]`) over the `kv.len()` cached positions followed by this call's
/// own keys and values (`k_new`, `v_new`: `[n, kv_heads * head_dim]`, f32),
/// which are then appended to `kv`. Returns `[n, heads * head_dim]`. With a
/// window, each query reads only the keys inside it (cached ones included),
/// so a decode step of a windowed layer costs `window` positions, not the
/// context.
///
/// Cached positions are read straight from the cache's storage (f16 or
/// int8) by the backend's widening dot/axpy, so a decode step costs one pass
/// over the cache and no allocation proportional to the context; the new
/// positions stay f32 so a one-shot forward is exactly the f32 computation.
///
/// With [`LayerKv::exact_steps`] set, the new positions are stored first
/// and query `i` reads those before it from the cache (at its storage
/// precision) and only its own key fresh, which is exactly what a one-token
/// forward at that position reads. Speculative decoding verifies a draft
/// this way, so its tokens are the ones decoding one at a time would give
/// (otherwise, with the f16 cache, they differ by f16 rounding).
pub fn attend(
    p: &AttnParams<'_>,
    q: &[f32],
    k_new: &[f32],
    v_new: &[f32],
    kv: &mut LayerKv,
    n: usize,
) -> Vec<f32> {
    let past = kv.len();
    if kv.exact_steps() && n > 1 {
        kv.append(k_new, v_new);
        attend_from(p, q, k_new, v_new, kv, n, past, true)
    } else {
        let out = attend_from(p, q, k_new, v_new, kv, n, past, false);
        kv.append(k_new, v_new);
        out
    }
}

/// [`attend`]'s attention for queries at positions `past..past + n`;
/// `stored`: `kv` already holds them, and query `i` reads cached positions
/// up to `past + i` and only itself from `k_new`/`v_new`.
#[allow(clippy::too_many_arguments)]
fn attend_from(
    p: &AttnParams<'_>,
    q: &[f32],
    k_new: &[f32],
    v_new: &[f32],
    kv: &LayerKv,
    n: usize,
    past: usize,
    stored: bool,
) -> Vec<f32> {
    let (heads, kv_heads, head_dim, scale) = (p.heads, p.kv_heads, p.head_dim, p.scale);
    let (qd, kd) = (heads * head_dim, kv_heads * head_dim);
    debug_assert_eq!(q.len(), n * qd);
    debug_assert_eq!(k_new.len(), n * kd);
    debug_assert_eq!(v_new.len(), n * kd);
    let group = heads / kv_heads;
    let sub = heads_per_task(group, n * heads, rayon::current_num_threads());
    let tasks_per_token = heads / sub;
    let be = kernels::backend();
    let mut out = vec![0.0; n * qd];
    // One task per (token, run of `sub` query heads sharing a KV head): the
    // cached keys and values are read once for the whole run.
    out.par_chunks_mut(sub * head_dim)
        .enumerate()
        .for_each_init(Vec::new, |scores: &mut Vec<f32>, (idx, o)| {
            let (i, h0) = (idx / tasks_per_token, (idx % tasks_per_token) * sub);
            let kh = h0 / group;
            // Visible keys: cached positions `cached`, then this call's
            // fresh keys `fresh` (indices into k_new), `ctx` in all.
            let first = p.first_key(past + i);
            let (cached, fresh) = if stored {
                (first.min(past + i)..past + i, i..i + 1)
            } else {
                (first.min(past)..past, first.saturating_sub(past)..i + 1)
            };
            let nc = cached.len();
            let ctx = nc + fresh.len();
            let qg = &q[i * qd + h0 * head_dim..i * qd + (h0 + sub) * head_dim];
            let row = |j: usize| j * kd + kh * head_dim..j * kd + (kh + 1) * head_dim;
            // Every element is written below (cached, then fresh positions),
            // so only growth is zero-filled.
            scores.resize(sub * ctx, 0.0);
            kv.key_dots_in(kh, qg, scores, ctx, cached.clone());
            for (h, qv) in qg.chunks_exact(head_dim).enumerate() {
                let sc = &mut scores[h * ctx..(h + 1) * ctx];
                for (s, j) in sc[nc..].iter_mut().zip(fresh.clone()) {
                    *s = be.dot(qv, &k_new[row(j)]);
                }
                softmax_with_sink(be, sc, scale, p.sinks.map(|s| s[h0 + h]));
            }
            o.fill(0.0);
            kv.value_axpys_in(kh, scores, ctx, o, cached.clone());
            for (h, oh) in o.chunks_exact_mut(head_dim).enumerate() {
                for (&w, j) in scores[h * ctx + nc..(h + 1) * ctx]
                    .iter()
                    .zip(fresh.clone())
                {
                    be.axpy(w, &v_new[row(j)], oh);
                }
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sink is one more logit in the denominator, unscaled, as
    /// transformers' `eager_attention_forward` concatenates it after the
    /// scaled scores; the weights then sum to less than 1.
    #[test]
    fn sink_joins_only_the_denominator() {
        let x = [1.0f32, -2.0, 3.5, 0.25];
        let (scale, sink) = (0.5f32, 1.25f32);
        let mut got = x;
        softmax_with_sink(kernels::backend(), &mut got, scale, Some(sink));
        let den: f64 =
            x.iter().map(|&v| ((v * scale) as f64).exp()).sum::<f64>() + (sink as f64).exp();
        for (g, &v) in got.iter().zip(&x) {
            let want = ((v * scale) as f64).exp() / den;
            assert!(
                (*g as f64 - want).abs() < 1e-6 * want.max(1e-3),
                "{g} vs {want}"
            );
        }
        // A sink far below the scores changes nothing; far above, it takes all.
        let mut low = x;
        softmax_with_sink(kernels::backend(), &mut low, scale, Some(-1e4));
        let mut plain = x;
        kernels::backend().softmax_scaled(&mut plain, scale);
        assert_eq!(low, plain);
        let mut high = x;
        softmax_with_sink(kernels::backend(), &mut high, scale, Some(1e4));
        assert!(high.iter().all(|&v| v == 0.0), "{high:?}");
    }

    /// A window of `w` keys: query `p` sees `p - w + 1 ..= p`.
    #[test]
    fn window_starts_w_minus_one_back() {
        let p = AttnParams::new(1, 1, 2).windowed(Some(3));
        assert_eq!(
            (0..6).map(|q| p.first_key(q)).collect::<Vec<_>>(),
            [0, 0, 0, 1, 2, 3]
        );
        assert_eq!(AttnParams::new(1, 1, 2).first_key(100), 0);
    }
}
