//! The decoder stack shared by the four MoE families, and its layer-by-layer
//! interface.
//!
//! Qwen3-MoE, Qwen2-MoE, Mixtral and OLMoE are one architecture with
//! different switches (q/k norm and its width, q/k/v bias, a gated shared
//! expert, top-k renormalization, tensor names); each family file turns a
//! config into a [`FamilySpec`] and this file does the arithmetic once.
//!
//! # Layer by layer (for prep)
//! A [`Transformer`] holds only what every layer shares (embeddings, final
//! norm, lm_head, rope). Layers are loaded, run and dropped on their own:
//! ```ignore
//! let (cfg, src) = models::open(path)?;
//! let tf = Transformer::load(&cfg, src.as_ref())?;
//! let mut hidden = tf.embed(&ids)?;                       // [n, hidden]
//! for l in 0..cfg.num_hidden_layers {
//!     let lw = tf.load_layer(src.as_ref(), l)?;           // attention, norms, router
//!     let mut ex = ResidentExperts::new(cfg.num_hidden_layers);
//!     ex.insert_layer(l, tf.load_layer_experts(src.as_ref(), l)?);
//!     let mut kv = tf.new_kv(KvBits::F16);                // fresh per sequence
//!     tf.layer_forward(&lw, &ex, &mut hidden, &mut kv, Some(&mut counts))?;
//! }                                                       // lw, ex dropped here
//! let logits = tf.final_logits(&hidden, false);
//! ```
//! `hidden` holds one sequence: to push a calibration batch through a layer,
//! call `layer_forward` once per sequence, each with a fresh [`LayerKv`].

use super::attention::{attention, AttnShape, AttnWeights, QkNorm};
use super::kv_cache::{KvBits, LayerKv};
use super::moe::{
    moe_forward_ext, norm_rows, ExpertMats, ExpertProvider, MoeWeights, NextLayer, RouterObserver,
    Routing, SharedExpert,
};
use super::rope::Rope;
use crate::config::ModelConfig;
use crate::error::RuntimeError;
use crate::kernels;
use crate::weights::{Matrix, WeightSource};

/// What distinguishes one family from another (see the family files).
#[derive(Debug, Clone)]
pub struct FamilySpec {
    pub qk_norm: QkNorm,
    /// The module holding router and experts: `mlp` or `block_sparse_moe`.
    pub moe_module: &'static str,
    /// Per-expert projection names in (gate, up, down) order.
    pub expert_proj: [&'static str; 3],
    /// A sigmoid-gated shared expert next to the routed ones (qwen2_moe).
    pub shared_expert: bool,
}

/// The feed-forward half of a layer. One per layer, so the size gap between
/// the variants costs a few kilobytes at most; boxing would only add an
/// indirection on the hot path.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)]
pub enum Ffn {
    Dense(ExpertMats),
    Moe(MoeWeights),
}

/// Everything of one layer except routed experts.
#[derive(Debug, Clone)]
pub struct LayerWeights {
    pub index: usize,
    pub input_norm: Vec<f32>,
    pub post_norm: Vec<f32>,
    pub attn: AttnWeights,
    pub ffn: Ffn,
}

/// The parts of a model shared by all layers, plus the per-family switches.
pub struct Transformer {
    pub cfg: ModelConfig,
    pub spec: FamilySpec,
    pub attn_shape: AttnShape,
    pub routing: Routing,
    rope: Rope,
    embed: Matrix,
    final_norm: Vec<f32>,
    lm_head: Matrix,
}

fn layer_name(l: usize, rest: &str) -> String {
    format!("model.layers.{l}.{rest}")
}

impl Transformer {
    /// Loads embeddings, final norm and lm_head (tied to the embeddings when
    /// the config says so or the checkpoint has no `lm_head`).
    pub fn load(cfg: &ModelConfig, src: &dyn WeightSource) -> Result<Self, RuntimeError> {
        let spec = super::family_spec(cfg).ok_or_else(|| {
            RuntimeError::Other(format!(
                "{} does not run on the shared decoder",
                cfg.arch.name()
            ))
        })?;
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let embed = src.matrix("model.embed_tokens", v, h)?;
        let lm_head = if cfg.tie_word_embeddings || !src.contains("lm_head.weight") {
            if !cfg.tie_word_embeddings {
                // Not tied and absent: report the missing tensor rather than guess.
                src.require("lm_head.weight")?;
            }
            embed.clone()
        } else {
            src.matrix("lm_head", v, h)?
        };
        Ok(Transformer {
            attn_shape: AttnShape {
                heads: cfg.num_attention_heads,
                kv_heads: cfg.num_key_value_heads,
                head_dim: cfg.head_dim,
                eps: cfg.rms_norm_eps,
                qk_norm: spec.qk_norm,
                clip_qkv: cfg.clip_qkv,
            },
            routing: Routing {
                top_k: cfg.num_experts_per_tok,
                renormalize: cfg.norm_topk_prob,
            },
            rope: Rope::new(cfg.rope_theta, cfg.head_dim),
            final_norm: src.vector("model.norm.weight", h)?,
            embed,
            lm_head,
            spec,
            cfg: cfg.clone(),
        })
    }

    /// Hidden states `[ids.len(), hidden]` for token ids.
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

    /// A fresh, empty KV cache for one layer.
    pub fn new_kv(&self, bits: KvBits) -> LayerKv {
        LayerKv::new(bits, self.cfg.num_key_value_heads, self.cfg.head_dim)
    }

    /// Loads layer `l`'s attention, norms and router/shared expert (or dense MLP).
    pub fn load_layer(
        &self,
        src: &dyn WeightSource,
        l: usize,
    ) -> Result<LayerWeights, RuntimeError> {
        let c = &self.cfg;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let (qd, kd) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
        let a = |n: &str| layer_name(l, &format!("self_attn.{n}"));
        let bias = |n: &str, len: usize| -> Result<Option<Vec<f32>>, RuntimeError> {
            if c.attention_bias {
                src.vector(&a(&format!("{n}.bias")), len).map(Some)
            } else {
                Ok(None)
            }
        };
        let (qn_len, kn_len) = match self.spec.qk_norm {
            QkNorm::None => (0, 0),
            QkNorm::PerHead => (hd, hd),
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
        let attn = AttnWeights {
            q: src.matrix(&a("q_proj"), qd, h)?,
            k: src.matrix(&a("k_proj"), kd, h)?,
            v: src.matrix(&a("v_proj"), kd, h)?,
            o: src.matrix(&a("o_proj"), h, qd)?,
            q_bias: bias("q_proj", qd)?,
            k_bias: bias("k_proj", kd)?,
            v_bias: bias("v_proj", kd)?,
            q_norm,
            k_norm,
        };
        let mlp = |prefix: &str, inter: usize| -> Result<ExpertMats, RuntimeError> {
            Ok(ExpertMats {
                gate: src.matrix(&format!("{prefix}.gate_proj"), inter, h)?,
                up: src.matrix(&format!("{prefix}.up_proj"), inter, h)?,
                down: src.matrix(&format!("{prefix}.down_proj"), h, inter)?,
            })
        };
        let ffn = if c.is_moe_layer(l) {
            let m = self.spec.moe_module;
            let shared = if self.spec.shared_expert && c.shared_expert_intermediate_size > 0 {
                Some(SharedExpert {
                    mlp: mlp(
                        &layer_name(l, "mlp.shared_expert"),
                        c.shared_expert_intermediate_size,
                    )?,
                    gate: src.matrix(&layer_name(l, "mlp.shared_expert_gate"), 1, h)?,
                })
            } else {
                None
            };
            Ffn::Moe(MoeWeights {
                router: src.matrix(&layer_name(l, &format!("{m}.gate")), c.num_experts, h)?,
                shared,
            })
        } else {
            Ffn::Dense(mlp(&layer_name(l, "mlp"), c.intermediate_size)?)
        };
        Ok(LayerWeights {
            index: l,
            input_norm: src.vector(&layer_name(l, "input_layernorm.weight"), h)?,
            post_norm: src.vector(&layer_name(l, "post_attention_layernorm.weight"), h)?,
            attn,
            ffn,
        })
    }

    /// Loads layer `l`'s routed experts (empty for a dense layer); names
    /// from [`super::layerwise::Layerwise`].
    pub fn load_layer_experts(
        &self,
        src: &dyn WeightSource,
        l: usize,
    ) -> Result<Vec<ExpertMats>, RuntimeError> {
        super::layerwise::Layerwise::layer_experts(self, src, l)
    }

    /// Runs layer `lw` over `hidden` (`[n, hidden]`, one sequence, positions
    /// `kv.len()..kv.len()+n`), in place; appends to `kv`.
    pub fn layer_forward(
        &self,
        lw: &LayerWeights,
        experts: &dyn ExpertProvider,
        hidden: &mut [f32],
        kv: &mut LayerKv,
        observer: Option<&mut (dyn RouterObserver + '_)>,
    ) -> Result<(), RuntimeError> {
        self.layer_forward_next(lw, None, experts, hidden, kv, observer)
    }

    /// [`Self::layer_forward`] that also lets the provider prefetch for the
    /// next layer `next` (its router applied to this layer's post-attention
    /// residual stream, see [`crate::cache::prefetch`]).
    pub fn layer_forward_next(
        &self,
        lw: &LayerWeights,
        next: Option<&LayerWeights>,
        experts: &dyn ExpertProvider,
        hidden: &mut [f32],
        kv: &mut LayerKv,
        observer: Option<&mut (dyn RouterObserver + '_)>,
    ) -> Result<(), RuntimeError> {
        let h = self.cfg.hidden_size;
        let n = hidden.len() / h;
        let eps = self.cfg.rms_norm_eps;
        let xn = norm_rows(hidden, &lw.input_norm, eps);
        let a = attention(&self.attn_shape, &lw.attn, &self.rope, &xn, n, kv);
        for (x, y) in hidden.iter_mut().zip(&a) {
            *x += y;
        }
        let xn = norm_rows(hidden, &lw.post_norm, eps);
        let proxy = match next {
            Some(
                nl @ LayerWeights {
                    ffn: Ffn::Moe(nm), ..
                },
            ) if experts.wants_next_hint(nl.index) => {
                Some((nl.index, &nm.router, norm_rows(hidden, &nl.post_norm, eps)))
            }
            _ => None,
        };
        let next = proxy.as_ref().map(|(layer, router, input)| NextLayer {
            layer: *layer,
            router,
            input,
        });
        let f = match &lw.ffn {
            Ffn::Dense(m) => m.forward(&xn, n),
            Ffn::Moe(mw) => {
                moe_forward_ext(lw.index, &self.routing, mw, experts, &xn, n, observer, next)?
            }
        };
        for (x, y) in hidden.iter_mut().zip(&f) {
            *x += y;
        }
        Ok(())
    }

    /// Final norm and lm_head: `[n, vocab]` logits if `all`, else the last row's `[vocab]`.
    pub fn final_logits(&self, hidden: &[f32], all: bool) -> Vec<f32> {
        let h = self.cfg.hidden_size;
        let n = hidden.len() / h;
        let rows = if all || n == 0 {
            hidden
        } else {
            &hidden[(n - 1) * h..]
        };
        let m = rows.len() / h;
        let xn = norm_rows(rows, &self.final_norm, self.cfg.rms_norm_eps);
        let mut out = vec![0.0; m * self.cfg.vocab_size];
        kernels::matmul(&self.lm_head.mat(), &xn, m, &mut out);
        out
    }
}
