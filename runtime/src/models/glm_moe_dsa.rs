//! GLM-5 (`GlmMoeDsaForCausalLM`): DeepSeek-V3.2's layer (MLA, DeepSeek
//! sparse attention, the sigmoid router with shared experts) with the
//! indexer's rope interleaved like MLA's, and `rms_norm_eps` 1e-5 by
//! default. transformers also lets a layer reuse the previous layer's
//! top-k selection (`indexer_types: "shared"`, or the older
//! `index_topk_pattern` / `index_topk_freq` keys); such configs are
//! refused by name, every layer here runs its own indexer.

use super::deepseek_v3::{parse_spec, DenseLayers, IndexerRope, MlaSpec};
use super::family::FamilyConfig;
use super::nn::config::JsonCfg;
use super::nn::indexer;
use crate::error::RuntimeError;

pub const SPEC: MlaSpec = MlaSpec {
    arch: "glm_moe_dsa",
    dense: DenseLayers::FirstK(3),
    rope_interleave_default: None,
    indexer: Some(IndexerRope::Interleaved),
    eps_default: 1e-5,
};

/// Parses a `glm_moe_dsa` config (the registry's entry point).
pub fn parse(c: &JsonCfg) -> Result<FamilyConfig, RuntimeError> {
    indexer::check_layer_types(c, true)?;
    parse_spec(c, SPEC)
}
