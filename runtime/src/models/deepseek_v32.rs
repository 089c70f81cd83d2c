//! DeepSeek-V3.2 (`DeepseekV32ForCausalLM`): DeepSeek-V3's layer plus
//! DeepSeek sparse attention, every layer with its own indexer
//! ([`super::nn::indexer`]) whose rope is half-split (not interleaved,
//! unlike MLA's, which always is here). Dense layers: `mlp_layer_types`,
//! else the first `first_k_dense_replace` (default 3, as transformers).
//! The reference's Hadamard rotation of the indexer's q and k is
//! orthogonal, so it leaves the scores as they are and is not applied.

use super::deepseek_v3::{parse_spec, DenseLayers, IndexerRope, MlaSpec};
use super::family::FamilyConfig;
use super::nn::config::JsonCfg;
use super::nn::indexer;
use crate::error::RuntimeError;

pub const SPEC: MlaSpec = MlaSpec {
    arch: "deepseek_v32",
    dense: DenseLayers::FirstK(3),
    rope_interleave_default: None,
    indexer: Some(IndexerRope::HalfSplit),
    eps_default: 1e-6,
};

/// Parses a `deepseek_v32` config (the registry's entry point).
pub fn parse(c: &JsonCfg) -> Result<FamilyConfig, RuntimeError> {
    indexer::check_layer_types(c, false)?;
    parse_spec(c, SPEC)
}
