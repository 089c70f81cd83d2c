//! MiniMax-M2 (`MiniMaxM2ForCausalLM`): the GQA block with RMSNorm over the
//! *whole* query and key projections (`q_norm` has `heads * head_dim`
//! weights, as OLMoE's; the hub's `qk_norm_type: per_layer`), rotary on the
//! first `rotary_dim` dimensions of each head, and a MoE of SwiGLU experts
//! under `block_sparse_moe` (`w1` gate, `w3` up, `w2` down) routed by
//! sigmoid scores: `e_score_correction_bias` steers selection only, the
//! selected scores are renormalized to sum to 1 (transformers'
//! `MiniMaxM2TopKRouter`, i.e. [`SigmoidRouting`] with one group and no
//! scaling). No shared expert, no dense layers, no biases.
//!
//! Config spellings: transformers 5's (`rope_parameters` with
//! `partial_rotary_factor`, `num_local_experts`) and the hub's
//! (`rope_theta` at the top, `rotary_dim` in dimensions, `use_qk_norm`,
//! `qk_norm_type`, `scoring_func`, `use_routing_bias`).

use super::decoder::kv_vector;
use super::family::{hub_expert_names, stacked_expert_names, Dims, Family, FamilyConfig};
use super::nn::attention::{gqa, AttnShape, AttnWeights, QkNorm};
use super::nn::config::JsonCfg;
use super::nn::kv_cache::{KvBits, LayerKv};
use super::nn::linear::{add_into, layer_name, norm_rows};
use super::nn::moe::{ffn_residual, Ffn, FfnLayer, MoeFfn, RouterObserver};
use super::nn::rope::Rope;
use super::nn::router::{SigmoidRouter, SigmoidRouting};
use crate::cache::WorkingShape;
use crate::error::RuntimeError;
use crate::experts::{ExpertNames, ExpertProvider};
use crate::weights::WeightSource;

/// The module holding router and experts.
const MOE: &str = "block_sparse_moe";

/// MiniMax-M2 as a [`Family`].
#[derive(Debug, Clone)]
pub struct MiniMaxM2 {
    dims: Dims,
    attn: AttnShape,
    rope: Rope,
    rule: SigmoidRouting,
    /// Selection bias present (`use_routing_bias`, default true).
    routing_bias: bool,
}

/// The rotated width: `partial_rotary_factor` of `head_dim` (transformers
/// 5), else the hub's `rotary_dim`, else all of it.
fn rotary_dim(c: &JsonCfg, head_dim: usize) -> Result<usize, RuntimeError> {
    match c.usize_opt("rotary_dim")? {
        Some(r) if !c.has("partial_rotary_factor") => {
            if r == 0 || !r.is_multiple_of(2) || r > head_dim {
                return Err(c.bad(
                    "rotary_dim",
                    format!("{r} must be even and in 2..={head_dim} (head_dim)"),
                ));
            }
            Ok(r)
        }
        _ => c.rotary_dim(head_dim, 1.0),
    }
}

/// Parses a `minimax_m2` config (the registry's entry point).
pub fn parse(c: &JsonCfg) -> Result<FamilyConfig, RuntimeError> {
    c.silu_only()?;
    c.default_rope_only()?;
    if let Some(f) = c.str_opt("scoring_func") {
        if f != "sigmoid" {
            return Err(c.bad(
                "scoring_func",
                format!("`{f}` is not supported (only sigmoid)"),
            ));
        }
    }
    if c.usize_opt("shared_intermediate_size")?.unwrap_or(0) > 0 {
        return Err(c.bad(
            "shared_intermediate_size",
            "shared experts are not supported",
        ));
    }
    if let Some(serde_json::Value::Array(a)) = c.obj.get("attn_type_list") {
        if a.iter().any(|v| v.as_u64() != Some(1)) {
            return Err(c.bad(
                "attn_type_list",
                "only full attention (1) is supported, not MiniMax-Text-01's linear attention",
            ));
        }
    }
    let hidden_size = c.positive("hidden_size")?;
    let heads = c.positive("num_attention_heads")?;
    let kv_heads = c.kv_heads(heads)?;
    let head_dim = c.usize_opt("head_dim")?.unwrap_or(hidden_size / heads);
    let rotary_dim = rotary_dim(c, head_dim)?;
    let num_experts = c.positive_any(&["num_local_experts", "num_experts"])?;
    let top_k = c.positive("num_experts_per_tok")?;
    if top_k > num_experts {
        return Err(c.bad(
            "num_experts_per_tok",
            format!("{top_k} > {num_experts} experts"),
        ));
    }
    let qk_norm = match (
        c.bool_opt("use_qk_norm")?.unwrap_or(true),
        c.str_opt("qk_norm_type").unwrap_or("per_layer"),
    ) {
        (false, _) => QkNorm::None,
        (true, "per_layer") => QkNorm::Full,
        (true, "per_head") => QkNorm::PerHead,
        (true, t) => {
            return Err(c.bad(
                "qk_norm_type",
                format!("`{t}` is not supported (per_layer or per_head)"),
            ))
        }
    };
    let eps = c.f64_opt("rms_norm_eps")?.unwrap_or(1e-6) as f32;
    Ok(FamilyConfig::new(MiniMaxM2 {
        dims: Dims {
            arch: "minimax_m2",
            vocab_size: c.positive("vocab_size")?,
            hidden_size,
            num_hidden_layers: c.positive("num_hidden_layers")?,
            num_experts,
            top_k,
            // The experts' width (MiniMax has no dense MLP).
            moe_intermediate_size: c.positive("intermediate_size")?,
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
            qk_norm,
            clip_qkv: None,
        },
        rope: Rope::new(
            c.f64_opt("rope_theta")?.unwrap_or(5_000_000.0) as f32,
            rotary_dim,
        ),
        rule: SigmoidRouting {
            top_k,
            n_group: 1,
            topk_group: 1,
            norm_topk_prob: true,
            routed_scaling_factor: 1.0,
        },
        routing_bias: c.bool_opt("use_routing_bias")?.unwrap_or(true),
    }))
}

/// Everything of one layer except routed experts.
#[derive(Debug, Clone)]
pub struct MiniMaxLayer {
    pub index: usize,
    pub input_norm: Vec<f32>,
    pub post_norm: Vec<f32>,
    pub attn: AttnWeights,
    pub ffn: Ffn<SigmoidRouter>,
}

impl MiniMaxLayer {
    fn ffn_layer(&self) -> FfnLayer<'_, SigmoidRouter> {
        FfnLayer {
            index: self.index,
            post_norm: &self.post_norm,
            ffn: &self.ffn,
        }
    }
}

impl Family for MiniMaxM2 {
    type Layer = MiniMaxLayer;
    type State = LayerKv;

    fn dims(&self) -> &Dims {
        &self.dims
    }

    fn is_moe_layer(&self, _l: usize) -> bool {
        true
    }

    fn expert_names(&self, l: usize, e: usize) -> ExpertNames {
        hub_expert_names(l, MOE, e, ["w1", "w3", "w2"])
    }

    fn stacked_expert_names(&self, l: usize) -> ExpertNames {
        stacked_expert_names(l, MOE)
    }

    fn working_shape(&self, kv: KvBits) -> WorkingShape {
        let (d, a) = (&self.dims, &self.attn);
        WorkingShape {
            hidden: d.hidden_size as u64,
            vocab: d.vocab_size as u64,
            kv_bytes_per_token: d.num_hidden_layers as u64
                * 2
                * a.kv_heads as u64
                * kv_vector(kv, a.head_dim),
            state_bytes: 0,
            qkv: ((a.heads + 2 * a.kv_heads) * a.head_dim) as u64,
            top_k: d.top_k as u64,
            expert_inter: d.moe_intermediate_size as u64,
            shared_inter: 0,
            experts: d.num_experts as u64,
        }
    }

    fn load_layer(&self, src: &dyn WeightSource, l: usize) -> Result<MiniMaxLayer, RuntimeError> {
        let (h, ne) = (self.dims.hidden_size, self.dims.num_experts);
        let bias = if self.routing_bias {
            src.vector(
                &layer_name(l, &format!("{MOE}.e_score_correction_bias")),
                ne,
            )?
        } else {
            vec![0.0; ne]
        };
        Ok(MiniMaxLayer {
            index: l,
            input_norm: src.vector(&layer_name(l, "input_layernorm.weight"), h)?,
            post_norm: src.vector(&layer_name(l, "post_attention_layernorm.weight"), h)?,
            attn: AttnWeights::load(src, l, &self.attn, h, false)?,
            ffn: Ffn::Moe(MoeFfn {
                router: SigmoidRouter {
                    weight: src.matrix(&layer_name(l, &format!("{MOE}.gate")), ne, h)?,
                    bias,
                    rule: self.rule,
                },
                shared: None,
                glu: crate::experts::Glu::Silu,
            }),
        })
    }

    fn new_state(&self, kv: KvBits) -> LayerKv {
        LayerKv::new(kv, self.attn.kv_heads, self.attn.head_dim)
    }

    fn layer_forward(
        &self,
        lw: &MiniMaxLayer,
        next: Option<&MiniMaxLayer>,
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
            next.map(MiniMaxLayer::ffn_layer),
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

    fn parse_str(s: &str) -> Result<MiniMaxM2, RuntimeError> {
        let f = parse(&JsonCfg::from_str(s, Path::new("config.json"))?)?;
        Ok(f.downcast::<MiniMaxM2>().unwrap().clone())
    }

    const BASE: &str = r#""model_type":"minimax_m2","vocab_size":100,"hidden_size":64,
        "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":16,
        "intermediate_size":32,"num_experts_per_tok":2"#;

    /// transformers 5's spelling and the hub's (MiniMaxAI/MiniMax-M2's
    /// config.json keys) give the same model.
    #[test]
    fn accepts_hub_and_transformers5_spellings() {
        let t5 = parse_str(&format!(
            r#"{{{BASE},"num_local_experts":8,"rope_parameters":{{"rope_type":"default",
            "rope_theta":5000000.0,"partial_rotary_factor":0.5}}}}"#
        ))
        .unwrap();
        let hub = parse_str(&format!(
            r#"{{{BASE},"num_local_experts":8,"rope_theta":5000000,"rotary_dim":8,
            "use_qk_norm":true,"qk_norm_type":"per_layer","scoring_func":"sigmoid",
            "use_routing_bias":true,"shared_intermediate_size":0,"attn_type_list":[1,1]}}"#
        ))
        .unwrap();
        for m in [&t5, &hub] {
            assert_eq!(m.rope.rotary_dim(), 8);
            assert_eq!(m.attn.qk_norm, QkNorm::Full);
            assert_eq!(m.dims.num_experts, 8);
            assert_eq!(m.dims.moe_intermediate_size, 32);
            assert!(m.routing_bias && m.rule.norm_topk_prob && m.rule.n_group == 1);
            assert_eq!(m.rule.routed_scaling_factor, 1.0);
        }
        let per_head = parse_str(&format!(
            r#"{{{BASE},"num_local_experts":8,"qk_norm_type":"per_head"}}"#
        ))
        .unwrap();
        assert_eq!(per_head.attn.qk_norm, QkNorm::PerHead);
        assert_eq!(
            per_head.rope.rotary_dim(),
            16,
            "no rotary key: all of head_dim"
        );
    }

    #[test]
    fn unsupported_variants_are_refused_by_name() {
        for (extra, key) in [
            (r#""scoring_func":"softmax""#, "scoring_func"),
            (
                r#""shared_intermediate_size":64"#,
                "shared_intermediate_size",
            ),
            (r#""attn_type_list":[0,1]"#, "attn_type_list"),
            (r#""rotary_dim":7"#, "rotary_dim"),
            (r#""qk_norm_type":"weird""#, "qk_norm_type"),
        ] {
            let e = parse_str(&format!(r#"{{{BASE},"num_local_experts":8,{extra}}}"#))
                .err()
                .unwrap_or_else(|| panic!("{extra} accepted"))
                .to_string();
            assert!(e.contains(key), "{extra}: {e}");
        }
        let e = parse_str(&format!("{{{BASE}}}")).err().unwrap().to_string();
        assert!(
            e.contains("num_local_experts") && e.contains("num_experts"),
            "{e}"
        );
    }
}
