//! GLM-4.7-Flash (`Glm4MoeLiteForCausalLM`): DeepSeek-V3's layer (MLA with
//! `rope_interleave`, the sigmoid group-limited router with shared
//! experts) under GLM's defaults: without `mlp_layer_types` only layer 0
//! is dense, as transformers' config has it (it does not read
//! `first_k_dense_replace`), and `rms_norm_eps` defaults to 1e-5.

use super::deepseek_v3::{parse_spec, DenseLayers, MlaSpec};
use super::family::FamilyConfig;
use super::nn::config::JsonCfg;
use crate::error::RuntimeError;

pub const SPEC: MlaSpec = MlaSpec {
    arch: "glm4_moe_lite",
    dense: DenseLayers::FirstOnly,
    rope_interleave_default: Some(true),
    indexer: None,
    eps_default: 1e-5,
};

/// Parses a `glm4_moe_lite` config (the registry's entry point).
pub fn parse(c: &JsonCfg) -> Result<FamilyConfig, RuntimeError> {
    parse_spec(c, SPEC)
}
