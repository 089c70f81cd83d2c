//! Qwen3-MoE (`Qwen3MoeForCausalLM`): RMSNorm on each query/key head before
//! rope, no attention bias, softmax-then-top-k routing with optional
//! renormalization (`norm_topk_prob`), dense SwiGLU layers where
//! `mlp_only_layers` / `decoder_sparse_step` say so.

use super::decoder::FamilySpec;
use super::nn::attention::QkNorm;

pub fn spec() -> FamilySpec {
    FamilySpec {
        name: "qwen3_moe",
        qk_norm: QkNorm::PerHead,
        moe_module: "mlp",
        expert_proj: ["gate_proj", "up_proj", "down_proj"],
        shared_expert: false,
        experts_in_intermediate_size: false,
        always_renormalize: false,
        bias_key: ("attention_bias", false),
    }
}
