//! GLM-4.x MoE (`Glm4MoeForCausalLM`): the GQA block with q/k/v bias
//! (`attention_bias`), optional per-head q/k RMSNorm (`use_qk_norm`) and
//! rotary on only the first `partial_rotary_factor * head_dim` dimensions
//! of each head; the DeepSeekMoE feed-forward (dense SwiGLU for the first
//! `first_k_dense_replace` layers, then the sigmoid group-limited router
//! with always-on `shared_experts` added unscaled).
//!
//! Its own family rather than a spec of the shared decoder because the
//! router, partial rotary and config keys differ.

use super::decoder::kv_vector;
use super::family::{Dims, Family, FamilyConfig};
use super::nn::attention::{gqa, AttnShape, AttnWeights, QkNorm};
use super::nn::config::JsonCfg;
use super::nn::kv_cache::{KvBits, LayerKv};
use super::nn::linear::{add_into, layer_name, norm_rows};
use super::nn::moe::{ffn_residual, DeepseekMoe, Ffn, FfnLayer, RouterObserver};
use super::nn::rope::Rope;
use super::nn::router::SigmoidRouter;
use crate::cache::WorkingShape;
use crate::error::RuntimeError;
use crate::experts::ExpertProvider;
use crate::weights::WeightSource;

/// GLM-4-MoE as a [`Family`].
#[derive(Debug, Clone)]
pub struct Glm4 {
    dims: Dims,
    attn: AttnShape,
    attention_bias: bool,
    rope: Rope,
    pub ffn: DeepseekMoe,
}

/// Parses a `glm4_moe` config (the registry's entry point).
pub fn parse(c: &JsonCfg) -> Result<FamilyConfig, RuntimeError> {
    c.silu_only()?;
    c.default_rope_only()?;
    let hidden_size = c.positive("hidden_size")?;
    let heads = c.positive("num_attention_heads")?;
    let kv_heads = c.kv_heads(heads)?;
    let head_dim = c.usize_opt("head_dim")?.unwrap_or(hidden_size / heads);
    let rotary_dim = c.rotary_dim(head_dim, 0.5)?;
    let eps = c.f64_opt("rms_norm_eps")?.unwrap_or(1e-5) as f32;
    let n_layers = c.positive("num_hidden_layers")?;
    let first_k = c.usize_opt("first_k_dense_replace")?.unwrap_or(0);
    let ffn = DeepseekMoe::from_cfg(c, hidden_size, n_layers, first_k)?;
    Ok(FamilyConfig::new(Glm4 {
        dims: Dims {
            arch: "glm4_moe",
            vocab_size: c.positive("vocab_size")?,
            hidden_size,
            num_hidden_layers: n_layers,
            num_experts: ffn.n_routed,
            top_k: ffn.rule.top_k,
            moe_intermediate_size: ffn.moe_intermediate,
            max_position_embeddings: c.usize_opt("max_position_embeddings")?.unwrap_or(4096),
            eps,
            tie_word_embeddings: c.bool_opt("tie_word_embeddings")?.unwrap_or(false),
            zero_centred_norm: false,
            bos_token_id: c.ids("bos_token_id")?.first().copied(),
            eos_token_ids: c.ids("eos_token_id")?,
        },
        attn: AttnShape {
            heads,
            kv_heads,
            head_dim,
            eps,
            qk_norm: if c.bool_opt("use_qk_norm")?.unwrap_or(false) {
                QkNorm::PerHead
            } else {
                QkNorm::None
            },
            clip_qkv: None,
        },
        attention_bias: c.bool_opt("attention_bias")?.unwrap_or(false),
        rope: Rope::new(
            c.f64_opt("rope_theta")?.unwrap_or(10000.0) as f32,
            rotary_dim,
        ),
        ffn,
    }))
}

/// Everything of one layer except routed experts.
#[derive(Debug, Clone)]
pub struct Glm4Layer {
    pub index: usize,
    pub input_norm: Vec<f32>,
    pub post_norm: Vec<f32>,
    pub attn: AttnWeights,
    pub ffn: Ffn<SigmoidRouter>,
}

impl Glm4Layer {
    fn ffn_layer(&self) -> FfnLayer<'_, SigmoidRouter> {
        FfnLayer {
            index: self.index,
            post_norm: &self.post_norm,
            ffn: &self.ffn,
        }
    }
}

impl Family for Glm4 {
    type Layer = Glm4Layer;
    type State = LayerKv;

    fn dims(&self) -> &Dims {
        &self.dims
    }

    fn is_moe_layer(&self, l: usize) -> bool {
        self.ffn.is_moe_layer(l)
    }

    fn working_shape(&self, kv: KvBits) -> WorkingShape {
        let (d, a) = (&self.dims, &self.attn);
        self.ffn.working_shape(
            d.vocab_size,
            d.num_hidden_layers as u64 * 2 * a.kv_heads as u64 * kv_vector(kv, a.head_dim),
            0,
            (a.heads + 2 * a.kv_heads) * a.head_dim,
        )
    }

    fn load_layer(&self, src: &dyn WeightSource, l: usize) -> Result<Glm4Layer, RuntimeError> {
        let h = self.dims.hidden_size;
        Ok(Glm4Layer {
            index: l,
            input_norm: src.vector(&layer_name(l, "input_layernorm.weight"), h)?,
            post_norm: src.vector(&layer_name(l, "post_attention_layernorm.weight"), h)?,
            attn: AttnWeights::load(src, l, &self.attn, h, self.attention_bias)?,
            ffn: self.ffn.load(src, l)?,
        })
    }

    fn new_state(&self, kv: KvBits) -> LayerKv {
        LayerKv::new(kv, self.attn.kv_heads, self.attn.head_dim)
    }

    fn layer_forward(
        &self,
        lw: &Glm4Layer,
        next: Option<&Glm4Layer>,
        experts: &dyn ExpertProvider,
        hidden: &mut [f32],
        kv: &mut LayerKv,
        observer: Option<&mut (dyn RouterObserver + '_)>,
    ) -> Result<(), RuntimeError> {
        let eps = self.dims.eps;
        let n = hidden.len() / self.dims.hidden_size;
        let xn = norm_rows(hidden, &lw.input_norm, eps);
        add_into(hidden, &gqa(&self.attn, &lw.attn, &self.rope, &xn, n, kv));
        ffn_residual(
            lw.ffn_layer(),
            next.map(Glm4Layer::ffn_layer),
            experts,
            hidden,
            eps,
            observer,
        )
    }
}
