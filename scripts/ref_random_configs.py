#!/usr/bin/env python3
"""Tiny random checkpoints of qwen3_5_moe (text and multimodal hub layout) and
minimax_m2 in shapes and seeds other than ../shared/fixtures, with
transformers' float32 reference logits and greedy tokens: a check that mfx is
right in general, not tuned to the fixtures.

Needs torch and transformers >= 5.25 (Qwen3_5Moe*, MiniMaxM2*). Writes, per
case, OUT/<case>/ with config.json, safetensors (bf16, as save_pretrained
writes them), reference.json (input_ids, greedy_16) and reference_logits.npy
(float32 [len, vocab], computed in float32 from the bf16 weights), the same
protocol as the shared fixtures.

    python3 scripts/ref_random_configs.py OUT
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers as tf


def scale_weights(model, seed):
    """Weights large enough that every layer matters (transformers' init std
    0.02 makes random models nearly constant), norms and gates perturbed away
    from their init so that a wrong (1 + w) or a missing gate shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
            elif "A_log" in name:
                p.copy_(torch.rand(p.shape, generator=g).mul(15).add(1).log())
            elif "dt_bias" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif "e_score_correction_bias" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(p + 0.2 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(0.05 * torch.randn(b.shape, generator=g))


def write(model, out: Path, seed: int, vocab: int, n_ids: int = 23):
    model = model.to(torch.bfloat16)
    model.save_pretrained(out, max_shard_size="200KB")
    model = model.to(torch.float32).eval()
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, vocab, (1, n_ids), generator=g)
    with torch.no_grad():
        logits = model(ids).logits[0].float().numpy()
        gen = model.generate(ids, max_new_tokens=16, do_sample=False, min_new_tokens=16)
    np.save(out / "reference_logits.npy", logits.astype(np.float32))
    ref = {"input_ids": ids[0].tolist(), "greedy_16": gen[0, n_ids:].tolist(),
           "transformers": tf.__version__, "seed": seed}
    (out / "reference.json").write_text(json.dumps(ref, indent=1))


def qwen35_text(seed, **kw):
    c = dict(vocab_size=384, hidden_size=96, num_hidden_layers=5, num_attention_heads=6,
             num_key_value_heads=2, head_dim=24, linear_num_key_heads=3, linear_num_value_heads=6,
             linear_key_head_dim=8, linear_value_head_dim=12, linear_conv_kernel_dim=3,
             num_experts=12, num_experts_per_tok=3, moe_intermediate_size=40,
             shared_expert_intermediate_size=56, max_position_embeddings=256,
             layer_types=["linear_attention", "linear_attention", "full_attention",
                          "linear_attention", "full_attention"],
             rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5},
             eos_token_id=1, pad_token_id=0, tie_word_embeddings=False)
    c.update(kw)
    return tf.Qwen3_5MoeTextConfig(**c)


def main():
    out = Path(sys.argv[1])
    cases = []
    # Text model, two shapes and seeds (one with tied embeddings).
    for seed, kw in [(11, {}), (12, dict(tie_word_embeddings=True, num_hidden_layers=3,
                                         layer_types=["linear_attention", "full_attention",
                                                      "linear_attention"],
                                         linear_num_key_heads=2, linear_num_value_heads=2))]:
        torch.manual_seed(seed)
        m = tf.Qwen3_5MoeForCausalLM(qwen35_text(seed, **kw))
        scale_weights(m, seed)
        cases.append((f"qwen3_5_moe_s{seed}", m, seed, 384))
    # Hub multimodal layout.
    seed = 13
    torch.manual_seed(seed)
    text = qwen35_text(seed).to_dict()
    text["rope_parameters"].update({"mrope_interleaved": True, "mrope_section": [2, 2, 2]})
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=96,
                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                  num_position_embeddings=64)
    m = tf.Qwen3_5MoeForConditionalGeneration(
        tf.Qwen3_5MoeConfig(text_config=text, vision_config=vision))
    scale_weights(m, seed)
    cases.append((f"qwen3_5_moe_hub_s{seed}", m, seed, 384))
    # MiniMax-M2, two shapes and seeds.
    for seed, kw in [(21, {}), (22, dict(num_key_value_heads=3, head_dim=32,
                                         rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                          "partial_rotary_factor": 0.25}))]:
        c = dict(vocab_size=384, hidden_size=96, intermediate_size=40, num_hidden_layers=4,
                 num_attention_heads=6, num_key_value_heads=2, head_dim=16, num_local_experts=12,
                 num_experts_per_tok=3, max_position_embeddings=256, eos_token_id=1,
                 pad_token_id=0,
                 rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                  "partial_rotary_factor": 0.5})
        c.update(kw)
        torch.manual_seed(seed)
        m = tf.MiniMaxM2ForCausalLM(tf.MiniMaxM2Config(**c))
        scale_weights(m, seed)
        cases.append((f"minimax_m2_s{seed}", m, seed, 384))
    for name, m, seed, vocab in cases:
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        write(m, d, seed, vocab)
        print(name, "ok", flush=True)


if __name__ == "__main__":
    main()
