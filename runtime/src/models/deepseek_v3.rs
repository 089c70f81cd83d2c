//! DeepSeek-V3 (`DeepseekV3ForCausalLM`) and the families that are its
//! layer with other switches: multi-head latent attention
//! ([`super::nn::mla`]), optionally with DeepSeek sparse attention's
//! indexer ([`super::nn::indexer`]), and the DeepSeekMoE feed-forward
//! (sigmoid group-limited router with shared experts; dense SwiGLU in the
//! first `first_k_dense_replace` layers or as `mlp_layer_types` says).
//!
//! The other families are a [`MlaSpec`] each: `glm4_moe_lite`
//! (GLM-4.7-Flash), `deepseek_v32` (DeepSeek-V3.2) and `glm_moe_dsa`
//! (GLM-5), in their own files.

use super::family::{Dims, Family, FamilyConfig};
use super::nn::config::JsonCfg;
use super::nn::indexer::{Indexer, IndexerKeys, IndexerWeights};
use super::nn::kv_cache::KvBits;
use super::nn::linear::{add_into, layer_name, norm_rows};
use super::nn::mla::{Mla, MlaState, MlaWeights};
use super::nn::moe::{ffn_residual, DeepseekMoe, Ffn, FfnLayer, RouterObserver};
use super::nn::router::SigmoidRouter;
use crate::cache::WorkingShape;
use crate::error::RuntimeError;
use crate::experts::ExpertProvider;
use crate::weights::WeightSource;

/// What tells the MLA families apart.
#[derive(Debug, Clone, Copy)]
pub struct MlaSpec {
    /// The registry's `model_type`.
    pub arch: &'static str,
    /// Dense layers when the config has no `mlp_layer_types`.
    pub dense: DenseLayers,
    /// Whether MLA's rope is interleaved: `rope_interleave` with this
    /// default, or `None` when the family always interleaves.
    pub rope_interleave_default: Option<bool>,
    /// DeepSeek sparse attention's indexer, and whether its rope is
    /// interleaved (GLM-5) or half-split (DeepSeek-V3.2).
    pub indexer: Option<IndexerRope>,
    /// `rms_norm_eps` when absent.
    pub eps_default: f64,
}

/// Which layers are dense when `mlp_layer_types` is absent.
#[derive(Debug, Clone, Copy)]
pub enum DenseLayers {
    /// The first `first_k_dense_replace` (this default when absent).
    FirstK(usize),
    /// Only layer 0, whatever else the config says (glm4_moe_lite's
    /// transformers config).
    FirstOnly,
}

/// How the indexer rotates its rope dims.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexerRope {
    HalfSplit,
    Interleaved,
}

/// DeepSeek-V3 itself.
pub const DEEPSEEK_V3: MlaSpec = MlaSpec {
    arch: "deepseek_v3",
    dense: DenseLayers::FirstK(3),
    rope_interleave_default: Some(true),
    indexer: None,
    eps_default: 1e-6,
};

/// An MLA family as a [`Family`] (deepseek_v3 and its specs).
#[derive(Debug, Clone)]
pub struct DeepseekV3 {
    dims: Dims,
    pub mla: Mla,
    pub ffn: DeepseekMoe,
    /// DeepSeek sparse attention (every layer has its own indexer).
    pub indexer: Option<Indexer>,
}

/// Parses a `deepseek_v3` config (the registry's entry point).
pub fn parse(c: &JsonCfg) -> Result<FamilyConfig, RuntimeError> {
    parse_spec(c, DEEPSEEK_V3)
}

/// Parses the config of the MLA family `spec`.
pub fn parse_spec(c: &JsonCfg, spec: MlaSpec) -> Result<FamilyConfig, RuntimeError> {
    c.silu_only()?;
    let hidden_size = c.positive("hidden_size")?;
    let n_layers = c.positive("num_hidden_layers")?;
    let eps = c.f64_opt("rms_norm_eps")?.unwrap_or(spec.eps_default) as f32;
    let interleave = match spec.rope_interleave_default {
        Some(d) => c.bool_opt("rope_interleave")?.unwrap_or(d),
        None => true,
    };
    let mla = Mla::from_cfg(c, interleave)?;
    let first_k = match spec.dense {
        DenseLayers::FirstK(d) => c.usize_opt("first_k_dense_replace")?.unwrap_or(d),
        DenseLayers::FirstOnly => 1,
    };
    let ffn = DeepseekMoe::from_cfg(c, hidden_size, n_layers, first_k)?;
    let indexer = match spec.indexer {
        None => None,
        Some(r) => {
            if mla.q_lora_rank.is_none() {
                return Err(c.bad(
                    "q_lora_rank",
                    "sparse attention's indexer reads the low-rank query: q_lora_rank must be set",
                ));
            }
            Some(Indexer::from_cfg(
                c,
                &mla.rope,
                r == IndexerRope::Interleaved,
            )?)
        }
    };
    Ok(FamilyConfig::new(DeepseekV3 {
        dims: Dims {
            arch: spec.arch,
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
        mla,
        ffn,
        indexer,
    }))
}

#[derive(Debug, Clone)]
pub struct DsLayer {
    pub index: usize,
    pub input_norm: Vec<f32>,
    pub post_norm: Vec<f32>,
    pub attn: MlaWeights,
    pub indexer: Option<IndexerWeights>,
    pub ffn: Ffn<SigmoidRouter>,
}

impl DsLayer {
    fn ffn_layer(&self) -> FfnLayer<'_, SigmoidRouter> {
        FfnLayer {
            index: self.index,
            post_norm: &self.post_norm,
            ffn: &self.ffn,
        }
    }
}

impl Family for DeepseekV3 {
    type Layer = DsLayer;
    type State = MlaState;

    fn dims(&self) -> &Dims {
        &self.dims
    }

    fn is_moe_layer(&self, l: usize) -> bool {
        self.ffn.is_moe_layer(l)
    }

    // MLA: keys and values are cached expanded, per head; the indexer
    // keeps one f32 key per position.
    fn working_shape(&self, kv: KvBits) -> WorkingShape {
        let (d, m) = (&self.dims, &self.mla);
        let index_key = self.indexer.as_ref().map_or(0, |ix| 4 * ix.head_dim as u64);
        let index_q = self.indexer.as_ref().map_or(0, |ix| ix.heads * ix.head_dim);
        self.ffn.working_shape(
            d.vocab_size,
            d.num_hidden_layers as u64 * (m.kv_bytes_per_token(kv) + index_key),
            0,
            m.qkv_width() + index_q,
        )
    }

    fn load_layer(&self, src: &dyn WeightSource, l: usize) -> Result<DsLayer, RuntimeError> {
        let h = self.dims.hidden_size;
        let indexer = match (&self.indexer, self.mla.q_lora_rank) {
            (Some(ix), Some(r)) => Some(ix.load(src, l, h, r)?),
            _ => None,
        };
        Ok(DsLayer {
            index: l,
            input_norm: src.vector(&layer_name(l, "input_layernorm.weight"), h)?,
            post_norm: src.vector(&layer_name(l, "post_attention_layernorm.weight"), h)?,
            attn: self.mla.load(src, l, h)?,
            indexer,
            ffn: self.ffn.load(src, l)?,
        })
    }

    fn new_state(&self, kv: KvBits) -> MlaState {
        MlaState {
            kv: self.mla.new_kv(kv),
            index: IndexerKeys::new(self.indexer.as_ref().map_or(0, |ix| ix.head_dim)),
        }
    }

    fn layer_forward(
        &self,
        lw: &DsLayer,
        next: Option<&DsLayer>,
        experts: &dyn ExpertProvider,
        hidden: &mut [f32],
        state: &mut MlaState,
        observer: Option<&mut (dyn RouterObserver + '_)>,
    ) -> Result<(), RuntimeError> {
        let eps = self.dims.eps;
        let n = hidden.len() / self.dims.hidden_size;
        let xn = norm_rows(hidden, &lw.input_norm, eps);
        let indexer = self.indexer.as_ref().zip(lw.indexer.as_ref());
        add_into(hidden, &self.mla.forward(&lw.attn, indexer, &xn, n, state));
        ffn_residual(
            lw.ffn_layer(),
            next.map(DsLayer::ffn_layer),
            experts,
            hidden,
            eps,
            observer,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// A small config in the hub's older spelling (top-level `rope_theta`,
    /// `rope_scaling`, no `mlp_layer_types`) with `extra` keys merged in.
    fn cfg(model_type: &str, extra: serde_json::Value) -> JsonCfg {
        let mut c = serde_json::json!({
            "model_type": model_type,
            "vocab_size": 512, "hidden_size": 64, "intermediate_size": 96,
            "moe_intermediate_size": 32, "num_hidden_layers": 5,
            "num_attention_heads": 4, "n_routed_experts": 16, "n_shared_experts": 1,
            "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2,
            "kv_lora_rank": 16, "q_lora_rank": 24, "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 8, "v_head_dim": 16, "rope_theta": 10000.0,
            "index_head_dim": 16, "index_n_heads": 2, "index_topk": 8
        });
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        JsonCfg::from_str(&c.to_string(), Path::new("config.json")).unwrap()
    }

    fn family(c: &JsonCfg) -> DeepseekV3 {
        super::super::registry::parse(c)
            .unwrap()
            .downcast::<DeepseekV3>()
            .unwrap()
            .clone()
    }

    fn err(c: &JsonCfg) -> String {
        super::super::registry::parse(c).unwrap_err().to_string()
    }

    #[test]
    fn hub_spellings_parse_with_each_familys_defaults() {
        // DeepSeek-V3.2 as the hub writes it: YaRN under `rope_scaling`
        // scales the softmax by mscale(40, 1)^2, and the first 3 layers are
        // dense by default.
        let f = family(&cfg(
            "deepseek_v32",
            serde_json::json!({"rope_scaling": {"type": "yarn", "factor": 40.0,
                "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                "beta_fast": 32, "beta_slow": 1}}),
        ));
        let m = 0.1 * 40f32.ln() + 1.0;
        assert!(
            (f.mla.scale - m * m / 24f32.sqrt()).abs() < 1e-6,
            "{}",
            f.mla.scale
        );
        assert_eq!(
            (0..5).map(|l| f.is_moe_layer(l)).collect::<Vec<_>>(),
            [false, false, false, true, true]
        );
        let ix = f.indexer.as_ref().unwrap();
        assert_eq!((ix.heads, ix.head_dim, ix.topk), (2, 16, 8));
        assert_eq!(f.dims.eps, 1e-6);
        // GLM-4.7-Flash: only layer 0 is dense, whatever first_k_dense_replace says.
        let f = family(&cfg(
            "glm4_moe_lite",
            serde_json::json!({"first_k_dense_replace": 2}),
        ));
        assert!(!f.is_moe_layer(0) && f.is_moe_layer(1));
        assert!(f.indexer.is_none());
        assert_eq!(f.dims.eps, 1e-5);
        // transformers 5's `mlp_layer_types` wins over first_k_dense_replace.
        let f = family(&cfg(
            "glm_moe_dsa",
            serde_json::json!({"mlp_layer_types": ["dense", "sparse", "dense", "sparse", "sparse"]}),
        ));
        assert_eq!(
            (0..5).map(|l| f.is_moe_layer(l)).collect::<Vec<_>>(),
            [false, true, false, true, true]
        );
        // A class name instead of model_type routes the same way.
        let f = family(&cfg("GlmMoeDsaForCausalLM", serde_json::json!({})));
        assert_eq!(f.dims.arch, "glm_moe_dsa");
    }

    #[test]
    fn bad_configs_are_refused_by_key() {
        let e = err(&cfg(
            "glm_moe_dsa",
            serde_json::json!({"mlp_layer_types": ["dense"]}),
        ));
        assert!(
            e.contains("mlp_layer_types") && e.contains("5 layer types"),
            "{e}"
        );
        let e = err(&cfg(
            "glm_moe_dsa",
            serde_json::json!({"indexer_types": ["full", "shared", "full", "shared", "full"]}),
        ));
        assert!(e.contains("indexer_types") && e.contains("shared"), "{e}");
        // transformers derives shared layers from index_topk_freq.
        let e = err(&cfg(
            "glm_moe_dsa",
            serde_json::json!({"index_topk_freq": 2}),
        ));
        assert!(e.contains("index_topk_freq"), "{e}");
        let e = err(&cfg(
            "deepseek_v32",
            serde_json::json!({"q_lora_rank": null}),
        ));
        assert!(e.contains("q_lora_rank"), "{e}");
        let e = err(&cfg(
            "deepseek_v32",
            serde_json::json!({"index_head_dim": 4}),
        ));
        assert!(e.contains("index_head_dim"), "{e}");
        let e = err(&cfg("deepseek_v32", serde_json::json!({"index_topk": 0})));
        assert!(e.contains("index_topk") && e.contains("positive"), "{e}");
        let e = err(&cfg(
            "deepseek_v32",
            serde_json::json!({"layer_types": ["indexed_attention", "full_attention",
                "indexed_attention", "indexed_attention", "indexed_attention"]}),
        ));
        assert!(e.contains("layer_types"), "{e}");
        let e = err(&cfg(
            "deepseek_v3",
            serde_json::json!({"attention_bias": true}),
        ));
        assert!(e.contains("attention_bias"), "{e}");
    }
}
