//! Mixtral (`MixtralForCausalLM`): experts under `block_sparse_moe` named
//! `w1` (gate), `w3` (up), `w2` (down); the top-k weights are always
//! renormalized, which equals a softmax over the top-k logits. No q/k norm,
//! no bias.

use super::decoder::FamilySpec;
use super::nn::attention::QkNorm;

pub fn spec() -> FamilySpec {
    FamilySpec {
        name: "mixtral",
        qk_norm: QkNorm::None,
        moe_module: "block_sparse_moe",
        expert_proj: ["w1", "w3", "w2"],
        shared_expert: false,
        experts_in_intermediate_size: true,
        always_renormalize: true,
        bias_key: ("attention_bias", false),
    }
}
