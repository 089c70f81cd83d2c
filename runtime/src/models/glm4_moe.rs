//! GLM-4.x MoE (`Glm4MoeForCausalLM`): grouped-query attention with q/k/v
//! bias (`attention_bias`), optional per-head q/k RMSNorm (`use_qk_norm`),
//! rotary on only the first `partial_rotary_factor * head_dim` dimensions of
//! each head (rotate-half pairing within that slice), dense SwiGLU for the
//! first `first_k_dense_replace` layers, then the DeepSeek-V3 sigmoid router
//! (see `sigmoid_moe.rs`) with always-on `shared_experts` added unscaled.
//!
//! Its own model type rather than a [`super::FamilySpec`] of the shared
//! decoder because the router, partial rotary and config keys differ; it
//! keeps the same layer-by-layer shape (`load_layer`, `load_layer_experts`,
//! `layer_forward`) and takes routed experts from an [`ExpertProvider`], so
//! the streaming cache can serve it.

use super::kv_cache::{KvBits, LayerKv};
use super::moe::{norm_rows, ExpertMats, ExpertProvider, ResidentExperts, RouterObserver};
use super::sigmoid_moe::{routed_forward, JsonCfg, SigmoidNext, SigmoidRouter, SigmoidRouting};
use super::{LoadOptions, Model, ModelInfo};
use crate::error::RuntimeError;
use crate::kernels::{self, rms_norm};
use crate::weights::safetensors::SafetensorsSource;
use crate::weights::{Matrix, WeightSource};
use rayon::prelude::*;
use std::path::Path;
use std::sync::Arc;

/// The config keys GLM-4-MoE uses.
#[derive(Debug, Clone)]
pub struct Glm4Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Leading dimensions of each head that rotate (even).
    pub rotary_dim: usize,
    pub rope_theta: f32,
    pub eps: f32,
    pub attention_bias: bool,
    pub use_qk_norm: bool,
    pub n_routed_experts: usize,
    pub moe_intermediate_size: usize,
    pub intermediate_size: usize,
    pub n_shared_experts: usize,
    pub first_k_dense_replace: usize,
    pub routing: SigmoidRouting,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl Glm4Config {
    pub fn parse(c: &JsonCfg) -> Result<Self, RuntimeError> {
        c.silu_only()?;
        c.default_rope_only()?;
        let hidden_size = c.positive("hidden_size")?;
        let heads = c.positive("num_attention_heads")?;
        let kv_heads = c.usize_opt("num_key_value_heads")?.unwrap_or(heads);
        if kv_heads == 0 || heads % kv_heads != 0 {
            return Err(c.bad(
                "num_key_value_heads",
                format!("{kv_heads} does not divide num_attention_heads = {heads}"),
            ));
        }
        let head_dim = c.usize_opt("head_dim")?.unwrap_or(hidden_size / heads);
        let prf = c.f64_opt("partial_rotary_factor")?.unwrap_or(0.5);
        let rotary_dim = (head_dim as f64 * prf) as usize;
        if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) || rotary_dim > head_dim {
            return Err(c.bad(
                "partial_rotary_factor",
                format!(
                    "{prf} x head_dim {head_dim} must give an even rotary width in 2..={head_dim}"
                ),
            ));
        }
        let n_routed_experts = c.positive("n_routed_experts")?;
        Ok(Glm4Config {
            vocab_size: c.positive("vocab_size")?,
            hidden_size,
            num_hidden_layers: c.positive("num_hidden_layers")?,
            heads,
            kv_heads,
            head_dim,
            rotary_dim,
            rope_theta: c.f64_opt("rope_theta")?.unwrap_or(10000.0) as f32,
            eps: c.f64_opt("rms_norm_eps")?.unwrap_or(1e-5) as f32,
            attention_bias: c.bool_opt("attention_bias")?.unwrap_or(false),
            use_qk_norm: c.bool_opt("use_qk_norm")?.unwrap_or(false),
            n_routed_experts,
            moe_intermediate_size: c.positive("moe_intermediate_size")?,
            intermediate_size: c.positive("intermediate_size")?,
            n_shared_experts: c.usize_opt("n_shared_experts")?.unwrap_or(0),
            first_k_dense_replace: c.usize_opt("first_k_dense_replace")?.unwrap_or(0),
            routing: SigmoidRouting::from_cfg(c, n_routed_experts)?,
            tie_word_embeddings: c.bool_opt("tie_word_embeddings")?.unwrap_or(false),
            max_position_embeddings: c.usize_opt("max_position_embeddings")?.unwrap_or(4096),
            bos_token_id: c.ids("bos_token_id")?.first().copied(),
            eos_token_ids: c.ids("eos_token_id")?,
        })
    }

    pub fn is_moe_layer(&self, l: usize) -> bool {
        l >= self.first_k_dense_replace
    }

    pub fn ffn_shape(&self) -> FfnShape {
        FfnShape {
            hidden: self.hidden_size,
            intermediate: self.intermediate_size,
            moe_intermediate: self.moe_intermediate_size,
            n_routed: self.n_routed_experts,
            n_shared: self.n_shared_experts,
            first_k_dense: self.first_k_dense_replace,
        }
    }
}

/// The feed-forward layout DeepSeek-V3 and GLM-4-MoE share: dense SwiGLU for
/// the first `first_k_dense` layers, then routed experts plus
/// `n_shared * moe_intermediate`-wide always-on `shared_experts`.
#[derive(Debug, Clone, Copy)]
pub struct FfnShape {
    pub hidden: usize,
    pub intermediate: usize,
    pub moe_intermediate: usize,
    pub n_routed: usize,
    pub n_shared: usize,
    pub first_k_dense: usize,
}

/// Layer `l`'s feed-forward weights except routed experts.
pub fn load_ffn(src: &dyn WeightSource, s: &FfnShape, l: usize) -> Result<Glm4Ffn, RuntimeError> {
    let h = s.hidden;
    if l < s.first_k_dense {
        return Ok(Glm4Ffn::Dense(mlp(src, &ln(l, "mlp"), h, s.intermediate)?));
    }
    let shared = if s.n_shared > 0 {
        Some(mlp(
            src,
            &ln(l, "mlp.shared_experts"),
            h,
            s.moe_intermediate * s.n_shared,
        )?)
    } else {
        None
    };
    Ok(Glm4Ffn::Moe {
        router: SigmoidRouter {
            weight: src.matrix(&ln(l, "mlp.gate"), s.n_routed, h)?,
            bias: src.vector(&ln(l, "mlp.gate.e_score_correction_bias"), s.n_routed)?,
        },
        shared,
    })
}

/// What the feed-forward half of a glm4_moe or deepseek_v3 layer needs of
/// that layer (both families share it; only their attention differs).
#[derive(Clone, Copy)]
pub struct FfnLayer<'a> {
    pub index: usize,
    pub post_norm: &'a [f32],
    pub ffn: &'a Glm4Ffn,
}

/// The second half of a glm4_moe / deepseek_v3 layer, after attention has
/// been added to `hidden`: normalize, run the feed-forward block (handing
/// the provider a prediction for `next` when it wants one), add its output.
pub fn ffn_residual(
    lw: FfnLayer<'_>,
    next: Option<FfnLayer<'_>>,
    routing: &SigmoidRouting,
    experts: &dyn ExpertProvider,
    hidden: &mut [f32],
    eps: f32,
    observer: Option<&mut (dyn RouterObserver + '_)>,
) -> Result<(), RuntimeError> {
    let n = hidden.len() / lw.post_norm.len();
    let xn = norm_rows(hidden, lw.post_norm, eps);
    // The next layer's router on this layer's post-attention residual under
    // the next layer's own post-attention norm.
    let proxy = next
        .filter(|nl| experts.wants_next_hint(nl.index))
        .and_then(|nl| match nl.ffn {
            Glm4Ffn::Moe { router, .. } => {
                Some((nl.index, router, norm_rows(hidden, nl.post_norm, eps)))
            }
            Glm4Ffn::Dense(_) => None,
        });
    let next = proxy.as_ref().map(|(layer, router, input)| SigmoidNext {
        layer: *layer,
        router,
        input,
    });
    let f = ffn_forward(lw.ffn, lw.index, routing, experts, &xn, n, observer, next)?;
    for (x, y) in hidden.iter_mut().zip(&f) {
        *x += y;
    }
    Ok(())
}

/// The feed-forward block over `n` rows of normalized `xn`.
#[allow(clippy::too_many_arguments)]
pub fn ffn_forward(
    ffn: &Glm4Ffn,
    layer: usize,
    routing: &SigmoidRouting,
    experts: &dyn ExpertProvider,
    xn: &[f32],
    n: usize,
    observer: Option<&mut (dyn RouterObserver + '_)>,
    next: Option<SigmoidNext<'_>>,
) -> Result<Vec<f32>, RuntimeError> {
    Ok(match ffn {
        Glm4Ffn::Dense(m) => m.forward(xn, n),
        Glm4Ffn::Moe { router, shared } => {
            let mut out = routed_forward(layer, routing, router, experts, xn, n, observer, next)?;
            if let Some(s) = shared {
                for (o, y) in out.iter_mut().zip(s.forward(xn, n)) {
                    *o += y;
                }
            }
            out
        }
    })
}

/// One layer's attention weights.
#[derive(Debug, Clone)]
pub struct Glm4Attn {
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

#[derive(Debug, Clone)]
pub enum Glm4Ffn {
    Dense(ExpertMats),
    Moe {
        router: SigmoidRouter,
        shared: Option<ExpertMats>,
    },
}

/// Everything of one layer except routed experts.
#[derive(Debug, Clone)]
pub struct Glm4Layer {
    pub index: usize,
    pub input_norm: Vec<f32>,
    pub post_norm: Vec<f32>,
    pub attn: Glm4Attn,
    pub ffn: Glm4Ffn,
}

impl Glm4Layer {
    pub fn ffn_layer(&self) -> FfnLayer<'_> {
        FfnLayer {
            index: self.index,
            post_norm: &self.post_norm,
            ffn: &self.ffn,
        }
    }
}

/// The parts shared by all layers.
pub struct Glm4Shared {
    pub cfg: Glm4Config,
    inv_freq: Vec<f32>,
    embed: Matrix,
    final_norm: Vec<f32>,
    lm_head: Matrix,
}

pub(crate) fn ln(l: usize, rest: &str) -> String {
    format!("model.layers.{l}.{rest}")
}

pub(crate) fn mlp(
    src: &dyn WeightSource,
    prefix: &str,
    h: usize,
    inter: usize,
) -> Result<ExpertMats, RuntimeError> {
    Ok(ExpertMats {
        gate: src.matrix(&format!("{prefix}.gate_proj"), inter, h)?,
        up: src.matrix(&format!("{prefix}.up_proj"), inter, h)?,
        down: src.matrix(&format!("{prefix}.down_proj"), h, inter)?,
    })
}

pub(crate) fn project(w: &Matrix, bias: &Option<Vec<f32>>, x: &[f32], n: usize) -> Vec<f32> {
    let mut y = vec![0.0; n * w.rows()];
    kernels::matmul(&w.mat(), x, n, &mut y);
    if let Some(b) = bias {
        for row in y.chunks_exact_mut(b.len()) {
            for (a, c) in row.iter_mut().zip(b) {
                *a += c;
            }
        }
    }
    y
}

pub(crate) fn norm_in_place(x: &mut [f32], width: usize, w: &[f32], eps: f32) {
    let mut tmp = vec![0.0; width];
    for row in x.chunks_exact_mut(width) {
        rms_norm(row, w, eps, &mut tmp);
        row.copy_from_slice(&tmp);
    }
}

/// `inv_freq[i] = 1 / theta^(2i / dim)` in f32, as transformers computes it.
pub(crate) fn inv_freq(theta: f32, dim: usize) -> Vec<f32> {
    (0..dim / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / dim as f32))
        .collect()
}

/// Rotate-half rope on the first `2 * freqs.len()` values of each
/// `stride`-wide head of `x`, at position `pos`.
pub(crate) fn rope_partial(x: &mut [f32], stride: usize, freqs: &[f32], pos: usize) {
    let half = freqs.len();
    let cs: Vec<(f32, f32)> = freqs
        .iter()
        .map(|f| {
            let a = pos as f32 * f;
            (a.cos(), a.sin())
        })
        .collect();
    for h in x.chunks_exact_mut(stride) {
        for (i, &(c, s)) in cs.iter().enumerate() {
            let (x1, x2) = (h[i], h[i + half]);
            h[i] = x1 * c - x2 * s;
            h[i + half] = x2 * c + x1 * s;
        }
    }
}

/// Causal attention of `n` new query rows over all keys (`total` rows,
/// the last `n` being the new ones). `q`: `[n, heads*qk_dim]`,
/// `keys`: `[total, kv_heads*qk_dim]`, `vals`: `[total, kv_heads*v_dim]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn causal_attend(
    q: &[f32],
    keys: &[f32],
    vals: &[f32],
    n: usize,
    heads: usize,
    kv_heads: usize,
    qk_dim: usize,
    v_dim: usize,
    scale: f32,
) -> Vec<f32> {
    let total = keys.len() / (kv_heads * qk_dim);
    let past = total - n;
    let (qd, kd, vd) = (heads * qk_dim, kv_heads * qk_dim, kv_heads * v_dim);
    let group = heads / kv_heads;
    let mut out = vec![0.0; n * heads * v_dim];
    out.par_chunks_mut(v_dim).enumerate().for_each_init(
        Vec::new,
        |scores: &mut Vec<f32>, (idx, o)| {
            let (i, h) = (idx / heads, idx % heads);
            let kh = h / group;
            let qv = &q[i * qd + h * qk_dim..i * qd + (h + 1) * qk_dim];
            let be = kernels::backend();
            scores.clear();
            scores.extend((0..past + i + 1).map(|j| {
                be.dot(qv, &keys[j * kd + kh * qk_dim..j * kd + (kh + 1) * qk_dim]) * scale
            }));
            kernels::softmax(scores);
            o.fill(0.0);
            for (j, &p) in scores.iter().enumerate() {
                be.axpy(p, &vals[j * vd + kh * v_dim..j * vd + (kh + 1) * v_dim], o);
            }
        },
    );
    out
}

impl Glm4Shared {
    pub fn load(cfg: &Glm4Config, src: &dyn WeightSource) -> Result<Self, RuntimeError> {
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let embed = src.matrix("model.embed_tokens", v, h)?;
        let lm_head = if cfg.tie_word_embeddings {
            embed.clone()
        } else {
            src.matrix("lm_head", v, h)?
        };
        Ok(Glm4Shared {
            inv_freq: inv_freq(cfg.rope_theta, cfg.rotary_dim),
            final_norm: src.vector("model.norm.weight", h)?,
            embed,
            lm_head,
            cfg: cfg.clone(),
        })
    }

    pub fn embed(&self, ids: &[u32]) -> Result<Vec<f32>, RuntimeError> {
        let h = self.cfg.hidden_size;
        let m = self.embed.mat();
        let mut out = vec![0.0; ids.len() * h];
        for (&id, o) in ids.iter().zip(out.chunks_exact_mut(h)) {
            if id as usize >= self.cfg.vocab_size {
                return Err(RuntimeError::TokenOutOfRange {
                    id,
                    vocab: self.cfg.vocab_size,
                });
            }
            m.row_f32(id as usize, o);
        }
        Ok(out)
    }

    pub fn new_kv(&self, bits: KvBits) -> LayerKv {
        LayerKv::new(bits, self.cfg.kv_heads, self.cfg.head_dim)
    }

    pub fn load_layer(&self, src: &dyn WeightSource, l: usize) -> Result<Glm4Layer, RuntimeError> {
        let c = &self.cfg;
        let h = c.hidden_size;
        let (qd, kd) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
        let bias = |name: &str, len: usize| -> Result<Option<Vec<f32>>, RuntimeError> {
            if c.attention_bias {
                Ok(Some(
                    src.vector(&ln(l, &format!("self_attn.{name}.bias")), len)?,
                ))
            } else {
                Ok(None)
            }
        };
        let qkn = |name: &str| -> Result<Option<Vec<f32>>, RuntimeError> {
            if c.use_qk_norm {
                Ok(Some(src.vector(
                    &ln(l, &format!("self_attn.{name}.weight")),
                    c.head_dim,
                )?))
            } else {
                Ok(None)
            }
        };
        let attn = Glm4Attn {
            q: src.matrix(&ln(l, "self_attn.q_proj"), qd, h)?,
            k: src.matrix(&ln(l, "self_attn.k_proj"), kd, h)?,
            v: src.matrix(&ln(l, "self_attn.v_proj"), kd, h)?,
            o: src.matrix(&ln(l, "self_attn.o_proj"), h, qd)?,
            q_bias: bias("q_proj", qd)?,
            k_bias: bias("k_proj", kd)?,
            v_bias: bias("v_proj", kd)?,
            q_norm: qkn("q_norm")?,
            k_norm: qkn("k_norm")?,
        };
        let ffn = load_ffn(src, &c.ffn_shape(), l)?;
        Ok(Glm4Layer {
            index: l,
            input_norm: src.vector(&ln(l, "input_layernorm.weight"), h)?,
            post_norm: src.vector(&ln(l, "post_attention_layernorm.weight"), h)?,
            attn,
            ffn,
        })
    }

    /// Layer `l`'s routed experts (empty for dense layers); names from
    /// [`super::layerwise::Layerwise`].
    pub fn load_layer_experts(
        &self,
        src: &dyn WeightSource,
        l: usize,
    ) -> Result<Vec<ExpertMats>, RuntimeError> {
        super::layerwise::Layerwise::layer_experts(self, src, l)
    }

    fn attention(&self, w: &Glm4Attn, xn: &[f32], n: usize, kv: &mut LayerKv) -> Vec<f32> {
        let c = &self.cfg;
        let hd = c.head_dim;
        let (qd, kd) = (c.heads * hd, c.kv_heads * hd);
        let mut q = project(&w.q, &w.q_bias, xn, n);
        let mut k = project(&w.k, &w.k_bias, xn, n);
        let v = project(&w.v, &w.v_bias, xn, n);
        if let (Some(qn), Some(kn)) = (&w.q_norm, &w.k_norm) {
            norm_in_place(&mut q, hd, qn, c.eps);
            norm_in_place(&mut k, hd, kn, c.eps);
        }
        let past = kv.len();
        for i in 0..n {
            rope_partial(&mut q[i * qd..(i + 1) * qd], hd, &self.inv_freq, past + i);
            rope_partial(&mut k[i * kd..(i + 1) * kd], hd, &self.inv_freq, past + i);
        }
        let out = super::attention::attend(
            &q,
            &k,
            &v,
            kv,
            n,
            c.heads,
            c.kv_heads,
            hd,
            1.0 / (hd as f32).sqrt(),
        );
        kv.append(&k, &v);
        let mut y = vec![0.0; n * w.o.rows()];
        kernels::matmul(&w.o.mat(), &out, n, &mut y);
        y
    }

    /// Runs layer `lw` over `hidden` (`[n, hidden]`, positions
    /// `kv.len()..kv.len()+n`) in place; appends to `kv`.
    pub fn layer_forward(
        &self,
        lw: &Glm4Layer,
        experts: &dyn ExpertProvider,
        hidden: &mut [f32],
        kv: &mut LayerKv,
        observer: Option<&mut (dyn RouterObserver + '_)>,
    ) -> Result<(), RuntimeError> {
        self.layer_forward_next(lw, None, experts, hidden, kv, observer)
    }

    /// [`Self::layer_forward`] that also lets the provider read ahead for
    /// the next layer `next` (see [`crate::cache::prefetch`]).
    pub fn layer_forward_next(
        &self,
        lw: &Glm4Layer,
        next: Option<&Glm4Layer>,
        experts: &dyn ExpertProvider,
        hidden: &mut [f32],
        kv: &mut LayerKv,
        observer: Option<&mut (dyn RouterObserver + '_)>,
    ) -> Result<(), RuntimeError> {
        let h = self.cfg.hidden_size;
        let n = hidden.len() / h;
        let eps = self.cfg.eps;
        let xn = norm_rows(hidden, &lw.input_norm, eps);
        let a = self.attention(&lw.attn, &xn, n, kv);
        for (x, y) in hidden.iter_mut().zip(&a) {
            *x += y;
        }
        ffn_residual(
            lw.ffn_layer(),
            next.map(Glm4Layer::ffn_layer),
            &self.cfg.routing,
            experts,
            hidden,
            eps,
            observer,
        )
    }

    pub fn final_logits(&self, hidden: &[f32], all: bool) -> Vec<f32> {
        final_logits(
            hidden,
            all,
            &self.final_norm,
            &self.lm_head,
            self.cfg.eps,
            self.cfg.hidden_size,
            self.cfg.vocab_size,
        )
    }
}

pub(crate) fn final_logits(
    hidden: &[f32],
    all: bool,
    norm: &[f32],
    lm_head: &Matrix,
    eps: f32,
    h: usize,
    vocab: usize,
) -> Vec<f32> {
    let n = hidden.len() / h;
    let rows = if all || n == 0 {
        hidden
    } else {
        &hidden[(n - 1) * h..]
    };
    let m = rows.len() / h;
    let xn = norm_rows(rows, norm, eps);
    let mut out = vec![0.0; m * vocab];
    kernels::matmul(&lm_head.mat(), &xn, m, &mut out);
    out
}

/// A loaded GLM-4-MoE with its KV cache.
pub struct Glm4Moe {
    info: ModelInfo,
    pub shared: Glm4Shared,
    layers: Vec<Glm4Layer>,
    experts: Arc<dyn ExpertProvider>,
    kv: Vec<LayerKv>,
}

impl Glm4Moe {
    /// Loads a Hugging Face checkpoint directory.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self, RuntimeError> {
        let c = JsonCfg::from_file(&dir.join("config.json"))?;
        let cfg = Glm4Config::parse(&c)?;
        let src = SafetensorsSource::open(dir)?;
        Self::from_source(&cfg, &src, opts, None)
    }

    pub fn from_source(
        cfg: &Glm4Config,
        src: &dyn WeightSource,
        opts: &LoadOptions,
        experts: Option<Arc<dyn ExpertProvider>>,
    ) -> Result<Self, RuntimeError> {
        let shared = Glm4Shared::load(cfg, src)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| shared.load_layer(src, l))
            .collect::<Result<Vec<_>, _>>()?;
        let experts = match experts {
            Some(p) => p,
            None => {
                let mut r = ResidentExperts::new(cfg.num_hidden_layers);
                for l in 0..cfg.num_hidden_layers {
                    r.insert_layer(l, shared.load_layer_experts(src, l)?);
                }
                Arc::new(r)
            }
        };
        let info = ModelInfo {
            arch: "glm4_moe".into(),
            vocab_size: cfg.vocab_size,
            hidden_size: cfg.hidden_size,
            n_layers: cfg.num_hidden_layers,
            max_position_embeddings: cfg.max_position_embeddings,
            max_context: opts.max_context.unwrap_or(cfg.max_position_embeddings),
            bos_token_id: cfg.bos_token_id,
            eos_token_ids: cfg.eos_token_ids.clone(),
            num_experts: cfg.n_routed_experts,
            num_experts_per_tok: cfg.routing.top_k,
        };
        let kv = (0..cfg.num_hidden_layers)
            .map(|_| shared.new_kv(opts.kv_bits))
            .collect();
        Ok(Glm4Moe {
            info,
            shared,
            layers,
            experts,
            kv,
        })
    }

    pub fn forward_observed(
        &mut self,
        tokens: &[u32],
        all_logits: bool,
        mut observer: Option<&mut (dyn RouterObserver + '_)>,
    ) -> Result<Vec<f32>, RuntimeError> {
        let past = self.seq_len();
        let needed = past + tokens.len();
        if needed > self.info.max_context {
            return Err(RuntimeError::ContextFull {
                needed,
                max: self.info.max_context,
            });
        }
        if tokens.is_empty() {
            return Ok(Vec::new());
        }
        let mut hidden = self.shared.embed(tokens)?;
        for (l, kv) in self.kv.iter_mut().enumerate() {
            let obs = observer.as_deref_mut();
            let (lw, next) = (&self.layers[l], self.layers.get(l + 1));
            if let Err(e) = self.shared.layer_forward_next(
                lw,
                next,
                self.experts.as_ref(),
                &mut hidden,
                kv,
                obs,
            ) {
                for kv in self.kv.iter_mut() {
                    kv.truncate(past);
                }
                return Err(e);
            }
        }
        Ok(self.shared.final_logits(&hidden, all_logits))
    }
}

impl Model for Glm4Moe {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn forward(&mut self, tokens: &[u32], all_logits: bool) -> Result<Vec<f32>, RuntimeError> {
        self.forward_observed(tokens, all_logits, None)
    }

    fn seq_len(&self) -> usize {
        self.kv.first().map_or(0, |k| k.len())
    }

    fn truncate(&mut self, len: usize) -> bool {
        if len > self.seq_len() {
            return false;
        }
        for kv in self.kv.iter_mut() {
            kv.truncate(len);
        }
        true
    }

    fn reset(&mut self) {
        for kv in self.kv.iter_mut() {
            kv.clear();
        }
    }
}
