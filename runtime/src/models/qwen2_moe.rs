//! Qwen2-MoE (`Qwen2MoeForCausalLM`): bias on q/k/v, no q/k norm, and next to
//! the routed experts an always-on shared expert whose output is scaled by
//! `sigmoid(shared_expert_gate(x))` (a `[1, hidden]` linear). Routing as
//! Qwen3-MoE (renormalized when `norm_topk_prob`).

use super::decoder::FamilySpec;
use super::nn::attention::QkNorm;

pub fn spec() -> FamilySpec {
    FamilySpec {
        name: "qwen2_moe",
        qk_norm: QkNorm::None,
        moe_module: "mlp",
        expert_proj: ["gate_proj", "up_proj", "down_proj"],
        shared_expert: true,
        experts_in_intermediate_size: false,
        always_renormalize: false,
        bias_key: ("qkv_bias", true),
    }
}
