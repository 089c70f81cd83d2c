//! Qwen3.5 / Qwen3.6 MoE (`Qwen3_5MoeForCausalLM`, model type
//! `qwen3_5_moe_text`; and the hub's multimodal
//! `Qwen3_5MoeForConditionalGeneration`, `qwen3_5_moe`, whose text model is
//! this one under `text_config`). The layer is Qwen3-Next's
//! ([`super::qwen3_next`], [`Variant::Qwen35`]): Gated DeltaNet and gated
//! full attention from `layer_types`, zero-centred norms, softmax top-k
//! with a sigmoid-gated shared expert. What differs, per transformers'
//! `modeling_qwen3_5_moe.py` against `modeling_qwen3_next.py`:
//!
//! - DeltaNet's input projections are four plain matrices
//!   (`in_proj_qkv` as `[q | k | v]`, `in_proj_z`, `in_proj_b`,
//!   `in_proj_a`) instead of two grouped per key head;
//! - the router always renormalizes its top-k (no `norm_topk_prob`), and
//!   there are no dense layers (no `mlp_only_layers`);
//! - rope is mrope (`mrope_section`, `mrope_interleaved`): for text every
//!   token has the same position on its three axes, which is the plain rope
//!   over the first `partial_rotary_factor * head_dim` dimensions.
//!
//! The multimodal layout's tensors (`model.language_model.*`, fused
//! `mlp.experts.gate_up_proj`, the vision tower and MTP head that mfx does
//! not run) are presented as the text model's by the weight source
//! (`crate::weights::hub_layout`).

use super::family::FamilyConfig;
use super::nn::config::JsonCfg;
use super::qwen3_next::{family, Qwen3NextConfig, Variant};
use crate::error::RuntimeError;

/// Parses a `qwen3_5_moe_text` config, or a `qwen3_5_moe` one through its
/// `text_config` (the registry's entry point for both).
pub fn parse(c: &JsonCfg) -> Result<FamilyConfig, RuntimeError> {
    let text = c.nested("text_config")?;
    let mut cfg = Qwen3NextConfig::parse_variant(text.as_ref().unwrap_or(c), Variant::Qwen35)?;
    // The multimodal model's embeddings and lm_head are tied (or not) by
    // its own top-level key where it has one.
    if text.is_some() {
        if let Some(tie) = c.bool_opt("tie_word_embeddings")? {
            cfg.tie_word_embeddings = tie;
        }
    }
    Ok(family(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::qwen3_next::Qwen3Next;
    use std::path::Path;

    fn cfg(text: &str) -> Result<Qwen3NextConfig, RuntimeError> {
        let c = JsonCfg::from_str(text, Path::new("config.json"))?;
        let f = parse(&c)?;
        assert_eq!(f.arch(), "qwen3_5_moe");
        Ok(f.downcast::<Qwen3Next>().unwrap().cfg.clone())
    }

    const TEXT: &str = r#""vocab_size":100,"hidden_size":64,"num_hidden_layers":4,
        "num_attention_heads":4,"num_key_value_heads":2,"head_dim":16,
        "linear_num_key_heads":2,"linear_num_value_heads":4,"linear_key_head_dim":8,
        "linear_value_head_dim":8,"linear_conv_kernel_dim":4,"num_experts":8,
        "num_experts_per_tok":2,"moe_intermediate_size":16,"shared_expert_intermediate_size":32,
        "full_attention_interval":2,"eos_token_id":7"#;

    /// transformers 5's spelling (`rope_parameters`), the hub's older one
    /// (`rope_theta` and `partial_rotary_factor` at the top, mrope in
    /// `rope_scaling`), and the multimodal nesting give the same model.
    #[test]
    fn accepts_every_spelling_and_the_multimodal_nesting() {
        let t5 = cfg(&format!(
            r#"{{"model_type":"qwen3_5_moe_text",{TEXT},"rope_parameters":{{"rope_type":"default",
            "rope_theta":1e7,"partial_rotary_factor":0.25,"mrope_section":[1,1,0],"mrope_interleaved":true}}}}"#
        ))
        .unwrap();
        let old = cfg(&format!(
            r#"{{"model_type":"qwen3_5_moe_text",{TEXT},"rope_theta":1e7,"partial_rotary_factor":0.25,
            "rope_scaling":{{"type":"mrope","mrope_section":[1,1,0]}}}}"#
        ))
        .unwrap();
        let hub = cfg(&format!(
            r#"{{"model_type":"qwen3_5_moe","architectures":["Qwen3_5MoeForConditionalGeneration"],
            "tie_word_embeddings":true,"vision_config":{{"depth":2}},
            "text_config":{{"model_type":"qwen3_5_moe_text",{TEXT},"tie_word_embeddings":false,
            "rope_parameters":{{"rope_type":"default","rope_theta":1e7,"partial_rotary_factor":0.25}}}}}}"#
        ))
        .unwrap();
        for c in [&t5, &old, &hub] {
            assert_eq!(c.variant, Variant::Qwen35);
            assert_eq!(c.rope_theta, 1e7);
            assert_eq!(c.rotary_dim, 4);
            assert_eq!(c.full_attention, vec![false, true, false, true]);
            assert!(c.norm_topk_prob, "Qwen3.5 always renormalizes");
            assert_eq!(c.eos_token_ids, vec![7]);
        }
        assert!(!t5.tie_word_embeddings && !old.tie_word_embeddings);
        assert!(hub.tie_word_embeddings, "the top-level key wins");
    }

    /// transformers 5 saves the config class's top-level
    /// `partial_rotary_factor` (0.25) beside the one its rope reads, in
    /// `rope_parameters`; the latter is the model's.
    #[test]
    fn rope_parameters_win_over_a_stale_top_level_copy() {
        let c = cfg(&format!(
            r#"{{"model_type":"qwen3_5_moe_text",{TEXT},"partial_rotary_factor":0.25,"rope_theta":1.0,
            "rope_parameters":{{"rope_type":"default","rope_theta":1e6,"partial_rotary_factor":0.5}}}}"#
        ))
        .unwrap();
        assert_eq!((c.rotary_dim, c.rope_theta), (8, 1e6));
    }

    #[test]
    fn errors_name_the_nested_key() {
        let e = cfg(r#"{"model_type":"qwen3_5_moe","text_config":{"hidden_size":64}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("text_config.num_hidden_layers"), "{e}");
        let e = cfg(&format!(
            r#"{{"model_type":"qwen3_5_moe","text_config":{{{TEXT},"rope_type":"yarn","factor":4.0}}}}"#
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("text_config.") && e.contains("yarn"), "{e}");
        let e = cfg(r#"{"model_type":"qwen3_5_moe","text_config":[1]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`text_config`") && e.contains("object"), "{e}");
    }
}
