//! OLMoE (`OlmoeForCausalLM`): RMSNorm over the *whole* query and key
//! projections (`q_norm` has `heads * head_dim` weights, applied before the
//! split into heads), optional `clip_qkv` clamping, top-k without
//! renormalization unless `norm_topk_prob`.

use super::decoder::FamilySpec;
use super::nn::attention::QkNorm;

pub fn spec() -> FamilySpec {
    FamilySpec {
        name: "olmoe",
        qk_norm: QkNorm::Full,
        moe_module: "mlp",
        expert_proj: ["gate_proj", "up_proj", "down_proj"],
        shared_expert: false,
        experts_in_intermediate_size: true,
        always_renormalize: false,
        bias_key: ("attention_bias", false),
    }
}
