#!/usr/bin/env python3
"""Write a synthetic MoE checkpoint (qwen3_moe, qwen3_next, qwen3_5_moe_text or
gpt_oss) in the Hugging Face hub layout.

Why: the real models mfx targets (Qwen3-30B-A3B and up) are tens of GB and
cannot be downloaded here, but speed and memory behaviour depend on shapes, not
on trained values. This writes random weights with the real shapes, in exactly
the layout `mfx prep` reads (config.json with hub keys, sharded bf16 safetensors
+ index, per-expert tensors, tokenizer.json), and optionally the same weights as
GGUF (bf16, Q4_0) for llama.cpp, so both runtimes load identical weights.

Properties worth knowing:
  * Deterministic: every tensor is drawn from its own stream seeded by
    (--seed, tensor name), so the output does not depend on write order, and a
    --layers 8 model is exactly the first 8 layers of the 48-layer one.
  * Streaming: one tensor is in memory at a time; the safetensors header is
    computed up front from shapes, then tensor bytes are appended. A 60 GB model
    needs a few hundred MB of RAM.
  * Scale: linear weights ~ N(0, 1/fan_in) and RMSNorm weights 1, so activations
    keep unit scale through the layers instead of exploding or vanishing; the
    embedding is N(0, 1) for the same reason.
  * Routing skew (--skew S): router row e of layer L is scaled by
    (1 + rank_L(e)) ** -S, where rank_L is a per-layer random permutation of the
    experts. A row with a larger norm produces larger-magnitude logits and lands
    in the top-k more often, so a few experts per layer are hot and which ones
    differs between layers, as in trained MoEs. S = 0 is uniform routing. The
    script estimates the resulting share of top-k picks taken by the top 25% of
    experts with Gaussian probe inputs and records it in synthetic.json; with
    128 experts / top-8: S=0 -> ~0.29, 0.25 -> ~0.51, 0.35 -> ~0.60,
    0.5 -> ~0.72, 1.0 -> ~0.92. The trained tiny model in shared/ has 0.54-0.68,
    hence the default 0.35.

  * qwen3_next presets (Qwen3-Next-80B-A3B / Qwen3-Coder-Next shapes): the
    tensor names and shapes of transformers' Qwen3NextForCausalLM as
    save_pretrained writes them (checked against ../shared/fixtures/qwen3_next),
    the published 3 linear-attention : 1 full-attention layer pattern
    (`layer_types`, and `full_attention_interval` 4), and initial values as
    transformers initialises them where that matters for numerics: the
    zero-centred RMSNorm weights (input/post-attention/final/q/k norms) are 0
    (the layer computes x * (1 + w)), the gated DeltaNet norm weight and
    `dt_bias` are 1, `A_log` is log(U(1, 16)) (transformers draws U(0, 16); the
    lower bound 1 avoids log(0)). No GGUF for these: scripts/hf_to_gguf.py
    converts qwen3_moe only.

  * qwen3.6-35b-a3b (Qwen3.6-35B-A3B = Qwen3.5-35B-A3B's architecture): the
    text-only checkpoint as transformers' Qwen3_5MoeForCausalLM saves it,
    `model_type: qwen3_5_moe_text`, checked against
    ../shared/fixtures/qwen3_5_moe: the qwen3_next layer with DeltaNet's
    input projections split into `in_proj_qkv` ([q | k | v]), `in_proj_z`,
    `in_proj_b`, `in_proj_a`; per-expert tensors; rope in `rope_parameters`.
    Same initial values as the qwen3_next presets (zero-centred norms 0).
    With --layers N the first N entries of the 3 linear : 1 full pattern
    are kept, so use N >= 4 to include a full-attention layer.

  * gpt-oss-120b: openai/gpt-oss-120b as the hub stores it (checked against
    ../shared/fixtures/gpt_oss_mxfp4): bf16 attention with q/k/v/o biases
    and per-head `sinks`, a `mlp.router` with bias, and each layer's experts
    fused and MXFP4-quantized: `mlp.experts.{gate_up,down}_proj_blocks`
    uint8 [E, rows, cols/32, 16] (two e2m1 codes a byte, low nibble the
    even element), `*_scales` uint8 e8m0 [E, rows, cols/32] (value
    2^(s - 127)), bf16 `*_bias` [E, rows]; the hub's older config spellings
    (`rope_scaling` YaRN, `experts_per_token`, `initial_context_length`,
    `quantization_config`) and its 0-based shard names
    (model-00000-of-0000N, N = shards - 1). Random MXFP4: every code byte
    uniform (the 16 e2m1 values have mean square 8.5625), every scale
    2^floor(x) or 2^(floor(x) + 1), x = log2(std / sqrt(8.5625)), drawn so
    that the expected mean square is std^2 with std = fan_in^-0.5 as for
    bf16 weights. MXFP4 tensors are drawn per expert (stream seeded by
    (--seed, "NAME[e]")), so at most one expert's bytes are in memory. All
    biases are N(0, 0.02^2) (transformers zero-initialises them; small
    nonzero values exercise the bias paths), sinks N(0, 1), norms 1 (not
    zero-centred). The router bias is part of the skew estimate.

  * Vocabulary: every preset uses the shared tiny model's tokenizer, so
    vocab_size is 8192 (eos 2 = <|im_end|>, pad 0) instead of the published
    size (Qwen3-30B-A3B 151936, Qwen3.6-35B-A3B 248320, gpt-oss-120b
    201088); embed_tokens and lm_head are correspondingly smaller, the
    expert path is unchanged.

Usage:
  gen_synthetic.py --preset ci-small -o /tmp/ci-small
  gen_synthetic.py --preset qwen3-30b-a3b --layers 8 -o /work/.peers/models/q30b-l8 --gguf --q4_0
  gen_synthetic.py --preset qwen3-coder-next --layers 8 --dry-run     # sizes only
  gen_synthetic.py --preset qwen3-next-small -o /tmp/next-small       # CI-sized qwen3_next
  gen_synthetic.py --preset qwen3.6-35b-a3b --layers 4 -o /work/.peers/models/qwen3.6-35b-a3b-l4
  gen_synthetic.py --preset gpt-oss-120b --layers 1 -o /work/.peers/models/gpt-oss-120b-l1
  gen_synthetic.py --preset gpt-oss-120b --dry-run                     # full depth, sizes only
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SHARED_TOKENIZER_DIR = REPO.parent / "shared" / "models" / "tiny-qwen3-moe-coder"
PEERS = Path(os.environ.get("MFX_PEERS_DIR", "/work/.peers"))

# Hub keys as in Qwen/Qwen3-30B-A3B's config.json; vocab cut to the shared
# tokenizer's 8192 (saves 1.2 GB of embedding + lm_head, changes nothing in the
# expert path that mfx is about). Special ids follow that tokenizer.
PRESETS: dict[str, dict] = {
    "qwen3-30b-a3b": dict(
        num_hidden_layers=48, hidden_size=2048, num_attention_heads=32, num_key_value_heads=4,
        head_dim=128, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
        intermediate_size=6144, max_position_embeddings=40960, max_window_layers=48,
    ),
    # A few tens of MB, several shards: for CI and quick end-to-end checks.
    "ci-small": dict(
        num_hidden_layers=4, hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
        head_dim=64, num_experts=32, num_experts_per_tok=4, moe_intermediate_size=64,
        intermediate_size=512, max_position_embeddings=4096, max_window_layers=4,
    ),
}
# qwen3_next (Gated DeltaNet + gated attention, 512 experts top-10 + a gated
# shared expert). Hub keys and dims as in Qwen/Qwen3-Next-80B-A3B-Instruct's
# config.json, which Qwen3-Coder-Next shares: 16 q / 2 kv heads of 256 with a
# quarter of each rotated, DeltaNet 16 qk heads / 32 v heads of 128, conv
# kernel 4, rope_theta 1e7. Vocab cut to 8192 as above.
NEXT_PRESETS: dict[str, dict] = {
    "qwen3-coder-next": dict(
        num_hidden_layers=48, hidden_size=2048, num_attention_heads=16, num_key_value_heads=2,
        head_dim=256, linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
        linear_value_head_dim=128, linear_conv_kernel_dim=4, num_experts=512, num_experts_per_tok=10,
        moe_intermediate_size=512, shared_expert_intermediate_size=512, intermediate_size=5120,
        full_attention_interval=4, partial_rotary_factor=0.25, rope_theta=10000000.0,
        max_position_embeddings=262144,
    ),
    # The same pattern (4 layers = 3 linear + 1 full) at a few MB: CI's qwen3_next run.
    "qwen3-next-small": dict(
        num_hidden_layers=4, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32,
        linear_value_head_dim=32, linear_conv_kernel_dim=4, num_experts=32, num_experts_per_tok=4,
        moe_intermediate_size=64, shared_expert_intermediate_size=64, intermediate_size=256,
        full_attention_interval=4, partial_rotary_factor=0.25, rope_theta=10000000.0,
        max_position_embeddings=4096,
    ),
}
# qwen3_5_moe_text (Qwen3.5/3.6 MoE text model): Qwen3.6-35B-A3B's text_config
# as published for Qwen3.5-35B-A3B (same architecture): 40 layers of
# 3 DeltaNet : 1 gated attention, 256 experts top-8 of width 512 plus a shared
# expert of 512, 16 q / 2 kv heads of 256 with a quarter rotated, DeltaNet
# 16 qk heads / 32 v heads of 128, conv kernel 4, rope_theta 1e7, 262144
# positions. Vocab cut to 8192 (published 248320).
QWEN35_PRESETS: dict[str, dict] = {
    "qwen3.6-35b-a3b": dict(
        num_hidden_layers=40, hidden_size=2048, num_attention_heads=16, num_key_value_heads=2,
        head_dim=256, linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
        linear_value_head_dim=128, linear_conv_kernel_dim=4, num_experts=256, num_experts_per_tok=8,
        moe_intermediate_size=512, shared_expert_intermediate_size=512, full_attention_interval=4,
        partial_rotary_factor=0.25, rope_theta=10000000.0, max_position_embeddings=262144,
        # Unsure: mrope as in the multimodal hub config's text_config (for
        # text the three axes share one position, so this is the plain rope).
        mrope_section=[11, 11, 10],
    ),
}
# gpt_oss: openai/gpt-oss-120b's config.json: 36 layers alternating sliding
# (window 128) and full attention, 64 q / 8 kv heads of 64 with biases and
# sinks, 128 experts top-4 of width 2880 (MXFP4), YaRN x32 over 4096,
# rope_theta 150000, clamped SwiGLU (limit 7). Vocab cut to 8192 (published
# 201088).
GPTOSS_PRESETS: dict[str, dict] = {
    "gpt-oss-120b": dict(
        num_hidden_layers=36, hidden_size=2880, num_attention_heads=64, num_key_value_heads=8,
        head_dim=64, num_local_experts=128, num_experts_per_tok=4, intermediate_size=2880,
        sliding_window=128, swiglu_limit=7.0, rope_theta=150000.0, yarn_factor=32.0,
        initial_context_length=4096, max_position_embeddings=131072,
    ),
}
PRESET_SHARD_BYTES = {"qwen3-30b-a3b": 2 * 10**9, "ci-small": 8 * 2**20,
                      "qwen3-coder-next": 2 * 10**9, "qwen3-next-small": 2 * 2**20,
                      "qwen3.6-35b-a3b": 2 * 10**9, "gpt-oss-120b": 2 * 10**9}
ALL_PRESETS = [*PRESETS, *NEXT_PRESETS, *QWEN35_PRESETS, *GPTOSS_PRESETS]


class GenError(Exception):
    pass


def hub_config(preset: str, layers: int | None) -> dict:
    if preset in NEXT_PRESETS:
        return next_hub_config(preset, layers)
    if preset in QWEN35_PRESETS:
        return qwen35_hub_config(preset, layers)
    if preset in GPTOSS_PRESETS:
        return gptoss_hub_config(preset, layers)
    p = dict(PRESETS[preset])
    if layers is not None:
        if not 1 <= layers <= p["num_hidden_layers"]:
            raise GenError(f"--layers {layers}: preset {preset} has 1..{p['num_hidden_layers']} layers")
        p["num_hidden_layers"] = layers
        p["max_window_layers"] = layers
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": None,
        "decoder_sparse_step": 1,
        "eos_token_id": 2,
        "head_dim": p["head_dim"],
        "hidden_act": "silu",
        "hidden_size": p["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": p["intermediate_size"],
        "max_position_embeddings": p["max_position_embeddings"],
        "max_window_layers": p["max_window_layers"],
        "mlp_only_layers": [],
        "model_type": "qwen3_moe",
        "moe_intermediate_size": p["moe_intermediate_size"],
        "norm_topk_prob": True,
        "num_attention_heads": p["num_attention_heads"],
        "num_experts": p["num_experts"],
        "num_experts_per_tok": p["num_experts_per_tok"],
        "num_hidden_layers": p["num_hidden_layers"],
        "num_key_value_heads": p["num_key_value_heads"],
        "output_router_logits": False,
        "pad_token_id": 0,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.001,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 8192,
    }


def cut_layers(preset: str, p: dict, layers: int | None) -> None:
    if layers is not None:
        if not 1 <= layers <= p["num_hidden_layers"]:
            raise GenError(f"--layers {layers}: preset {preset} has 1..{p['num_hidden_layers']} layers")
        p["num_hidden_layers"] = layers


def hybrid_layer_types(p: dict) -> list[str]:
    """Cutting layers keeps the first N of the full model's pattern."""
    k = p["full_attention_interval"]
    return ["full_attention" if (i + 1) % k == 0 else "linear_attention"
            for i in range(p["num_hidden_layers"])]


def next_hub_config(preset: str, layers: int | None) -> dict:
    p = dict(NEXT_PRESETS[preset])
    cut_layers(preset, p, layers)
    k = p["full_attention_interval"]
    layer_types = hybrid_layer_types(p)
    return {
        "architectures": ["Qwen3NextForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": None,
        "decoder_sparse_step": 1,
        "eos_token_id": 2,
        "full_attention_interval": k,
        "head_dim": p["head_dim"],
        "hidden_act": "silu",
        "hidden_size": p["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": p["intermediate_size"],
        "layer_types": layer_types,
        "linear_conv_kernel_dim": p["linear_conv_kernel_dim"],
        "linear_key_head_dim": p["linear_key_head_dim"],
        "linear_num_key_heads": p["linear_num_key_heads"],
        "linear_num_value_heads": p["linear_num_value_heads"],
        "linear_value_head_dim": p["linear_value_head_dim"],
        "max_position_embeddings": p["max_position_embeddings"],
        "mlp_only_layers": [],
        "model_type": "qwen3_next",
        "moe_intermediate_size": p["moe_intermediate_size"],
        "norm_topk_prob": True,
        "num_attention_heads": p["num_attention_heads"],
        "num_experts": p["num_experts"],
        "num_experts_per_tok": p["num_experts_per_tok"],
        "num_hidden_layers": p["num_hidden_layers"],
        "num_key_value_heads": p["num_key_value_heads"],
        "output_router_logits": False,
        "pad_token_id": 0,
        "partial_rotary_factor": p["partial_rotary_factor"],
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": p["rope_theta"],
        "router_aux_loss_coef": 0.001,
        "shared_expert_intermediate_size": p["shared_expert_intermediate_size"],
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.57.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 8192,
    }


def qwen35_hub_config(preset: str, layers: int | None) -> dict:
    """Keys as in ../shared/fixtures/qwen3_5_moe/config.json (transformers 5's
    Qwen3_5MoeTextConfig: rope in `rope_parameters`, no `intermediate_size`,
    `mlp_only_layers` or `norm_topk_prob`), plus `full_attention_interval`
    as in the hub's text_config. Unsure, from memory of the hub config, not
    checkable offline: `mrope_section` / `mrope_interleaved`, rms_norm_eps
    1e-6, router_aux_loss_coef 0.001."""
    p = dict(QWEN35_PRESETS[preset])
    cut_layers(preset, p, layers)
    k = p["full_attention_interval"]
    layer_types = hybrid_layer_types(p)
    return {
        "architectures": ["Qwen3_5MoeForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": None,
        "dtype": "bfloat16",
        "eos_token_id": 2,
        "full_attention_interval": k,
        "head_dim": p["head_dim"],
        "hidden_act": "silu",
        "hidden_size": p["hidden_size"],
        "initializer_range": 0.02,
        "layer_types": layer_types,
        "linear_conv_kernel_dim": p["linear_conv_kernel_dim"],
        "linear_key_head_dim": p["linear_key_head_dim"],
        "linear_num_key_heads": p["linear_num_key_heads"],
        "linear_num_value_heads": p["linear_num_value_heads"],
        "linear_value_head_dim": p["linear_value_head_dim"],
        "max_position_embeddings": p["max_position_embeddings"],
        "model_type": "qwen3_5_moe_text",
        "moe_intermediate_size": p["moe_intermediate_size"],
        "num_attention_heads": p["num_attention_heads"],
        "num_experts": p["num_experts"],
        "num_experts_per_tok": p["num_experts_per_tok"],
        "num_hidden_layers": p["num_hidden_layers"],
        "num_key_value_heads": p["num_key_value_heads"],
        "output_router_logits": False,
        "pad_token_id": 0,
        "rms_norm_eps": 1e-06,
        "rope_parameters": {
            "mrope_interleaved": True,
            "mrope_section": p["mrope_section"],
            "partial_rotary_factor": p["partial_rotary_factor"],
            "rope_theta": p["rope_theta"],
            "rope_type": "default",
        },
        "router_aux_loss_coef": 0.001,
        "shared_expert_intermediate_size": p["shared_expert_intermediate_size"],
        "tie_word_embeddings": False,
        "transformers_version": "5.25.0",
        "use_cache": True,
        "vocab_size": 8192,
    }


def gptoss_hub_config(preset: str, layers: int | None) -> dict:
    """Keys as in ../shared/fixtures/gpt_oss_mxfp4/config.json, the hub's
    spellings. Unsure (from memory of openai/gpt-oss-120b's config.json, not
    checkable offline): router_aux_loss_coef 0.9 (the fixture has 0.001;
    unused at inference), rms_norm_eps 1e-5, `truncate: false` in
    rope_scaling."""
    p = dict(GPTOSS_PRESETS[preset])
    cut_layers(preset, p, layers)
    layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention"
                   for i in range(p["num_hidden_layers"])]
    return {
        "architectures": ["GptOssForCausalLM"],
        "attention_bias": True,
        "attention_dropout": 0.0,
        "bos_token_id": None,
        "dtype": "bfloat16",
        "eos_token_id": 2,
        "experts_per_token": p["num_experts_per_tok"],
        "head_dim": p["head_dim"],
        "hidden_act": "silu",
        "hidden_size": p["hidden_size"],
        "initial_context_length": p["initial_context_length"],
        "initializer_range": 0.02,
        "intermediate_size": p["intermediate_size"],
        "layer_types": layer_types,
        "max_position_embeddings": p["max_position_embeddings"],
        "model_type": "gpt_oss",
        "num_attention_heads": p["num_attention_heads"],
        "num_experts_per_tok": p["num_experts_per_tok"],
        "num_hidden_layers": p["num_hidden_layers"],
        "num_key_value_heads": p["num_key_value_heads"],
        "num_local_experts": p["num_local_experts"],
        "output_router_logits": False,
        "pad_token_id": 0,
        "quantization_config": {
            "modules_to_not_convert": [
                "model.layers.*.self_attn",
                "model.layers.*.mlp.router",
                "model.embed_tokens",
                "lm_head",
            ],
            "quant_method": "mxfp4",
        },
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "factor": p["yarn_factor"],
            "original_max_position_embeddings": p["initial_context_length"],
            "rope_type": "yarn",
            "truncate": False,
        },
        "rope_theta": p["rope_theta"],
        "router_aux_loss_coef": 0.9,
        "sliding_window": p["sliding_window"],
        "swiglu_limit": p["swiglu_limit"],
        "tie_word_embeddings": False,
        "transformers_version": "4.55.0.dev0",
        "use_cache": True,
        "vocab_size": 8192,
    }


def num_experts(cfg: dict) -> int:
    return cfg["num_local_experts"] if cfg["model_type"] == "gpt_oss" else cfg["num_experts"]


def router_name(cfg: dict, layer: int) -> str:
    mod = "router" if cfg["model_type"] == "gpt_oss" else "gate"
    return f"model.layers.{layer}.mlp.{mod}"


@dataclass
class Spec:
    name: str
    shape: tuple[int, ...]
    kind: str  # "normal" | "ones" | "zeros" | "alog" | "router" | "mxfp4_blocks" | "mxfp4_scales"
    std: float = 1.0
    layer: int = -1

    @property
    def dtype(self) -> str:
        return "U8" if self.kind.startswith("mxfp4") else "BF16"

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * (1 if self.dtype == "U8" else 2)

    @property
    def params(self) -> int:
        """Weights this tensor holds (a code byte holds two; scales none)."""
        if self.kind == "mxfp4_blocks":
            return self.nbytes * 2
        return 0 if self.kind == "mxfp4_scales" else self.nbytes // 2


def tensor_specs(cfg: dict) -> list[Spec]:
    """All tensors in the order transformers' save_pretrained lists them."""
    if cfg["model_type"] == "qwen3_next":
        return next_tensor_specs(cfg)
    if cfg["model_type"] == "qwen3_5_moe_text":
        return qwen35_tensor_specs(cfg)
    if cfg["model_type"] == "gpt_oss":
        return gptoss_tensor_specs(cfg)
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    hd, nq, nkv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    E, ff = cfg["num_experts"], cfg["moe_intermediate_size"]
    out = [Spec("model.embed_tokens.weight", (v, h), "normal", 1.0)]
    for L in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{L}"
        out += [
            Spec(f"{p}.input_layernorm.weight", (h,), "ones"),
            Spec(f"{p}.self_attn.q_proj.weight", (nq * hd, h), "normal", h**-0.5),
            Spec(f"{p}.self_attn.k_proj.weight", (nkv * hd, h), "normal", h**-0.5),
            Spec(f"{p}.self_attn.v_proj.weight", (nkv * hd, h), "normal", h**-0.5),
            Spec(f"{p}.self_attn.o_proj.weight", (h, nq * hd), "normal", (nq * hd) ** -0.5),
            Spec(f"{p}.self_attn.q_norm.weight", (hd,), "ones"),
            Spec(f"{p}.self_attn.k_norm.weight", (hd,), "ones"),
            Spec(f"{p}.post_attention_layernorm.weight", (h,), "ones"),
            Spec(f"{p}.mlp.gate.weight", (E, h), "router", h**-0.5, L),
        ]
        for e in range(E):
            out += [
                Spec(f"{p}.mlp.experts.{e}.gate_proj.weight", (ff, h), "normal", h**-0.5),
                Spec(f"{p}.mlp.experts.{e}.up_proj.weight", (ff, h), "normal", h**-0.5),
                Spec(f"{p}.mlp.experts.{e}.down_proj.weight", (h, ff), "normal", ff**-0.5),
            ]
    out += [
        Spec("model.norm.weight", (h,), "ones"),
        Spec("lm_head.weight", (v, h), "normal", h**-0.5),
    ]
    return out


def next_tensor_specs(cfg: dict, split_projections: bool = False) -> list[Spec]:
    """Qwen3NextForCausalLM's tensors. Shapes: DeltaNet in_proj_qkvz
    [2*nk*dk + 2*nv*dv, h], in_proj_ba [2*nv, h], depthwise conv1d
    [2*nk*dk + nv*dv, 1, K], A_log / dt_bias [nv], gated norm [dv], out_proj
    [h, nv*dv]; gated attention q_proj [2*nq*hd, h] (query and output gate).
    The zero-centred norms get 0, see the module docstring."""
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    hd, nq, nkv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    nk, nv = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
    dk, dv, K = cfg["linear_key_head_dim"], cfg["linear_value_head_dim"], cfg["linear_conv_kernel_dim"]
    E, ff, sff = cfg["num_experts"], cfg["moe_intermediate_size"], cfg["shared_expert_intermediate_size"]
    out = [Spec("model.embed_tokens.weight", (v, h), "normal", 1.0)]
    for L, kind in enumerate(cfg["layer_types"]):
        p = f"model.layers.{L}"
        if kind == "linear_attention":
            a = f"{p}.linear_attn"
            out += [
                Spec(f"{a}.dt_bias", (nv,), "ones"),
                Spec(f"{a}.A_log", (nv,), "alog"),
                Spec(f"{a}.conv1d.weight", (2 * nk * dk + nv * dv, 1, K), "normal", K**-0.5),
            ]
            if split_projections:  # Qwen3.5: the fused projections split in four
                out += [
                    Spec(f"{a}.in_proj_qkv.weight", (2 * nk * dk + nv * dv, h), "normal", h**-0.5),
                    Spec(f"{a}.in_proj_z.weight", (nv * dv, h), "normal", h**-0.5),
                    Spec(f"{a}.in_proj_b.weight", (nv, h), "normal", h**-0.5),
                    Spec(f"{a}.in_proj_a.weight", (nv, h), "normal", h**-0.5),
                ]
            else:
                out += [
                    Spec(f"{a}.in_proj_qkvz.weight", (2 * nk * dk + 2 * nv * dv, h), "normal", h**-0.5),
                    Spec(f"{a}.in_proj_ba.weight", (2 * nv, h), "normal", h**-0.5),
                ]
            out += [
                Spec(f"{a}.norm.weight", (dv,), "ones"),
                Spec(f"{a}.out_proj.weight", (h, nv * dv), "normal", (nv * dv) ** -0.5),
            ]
        else:
            a = f"{p}.self_attn"
            out += [
                Spec(f"{a}.q_proj.weight", (2 * nq * hd, h), "normal", h**-0.5),
                Spec(f"{a}.k_proj.weight", (nkv * hd, h), "normal", h**-0.5),
                Spec(f"{a}.v_proj.weight", (nkv * hd, h), "normal", h**-0.5),
                Spec(f"{a}.o_proj.weight", (h, nq * hd), "normal", (nq * hd) ** -0.5),
                Spec(f"{a}.q_norm.weight", (hd,), "zeros"),
                Spec(f"{a}.k_norm.weight", (hd,), "zeros"),
            ]
        out.append(Spec(f"{p}.mlp.gate.weight", (E, h), "router", h**-0.5, L))
        for e in range(E):
            out += [
                Spec(f"{p}.mlp.experts.{e}.gate_proj.weight", (ff, h), "normal", h**-0.5),
                Spec(f"{p}.mlp.experts.{e}.up_proj.weight", (ff, h), "normal", h**-0.5),
                Spec(f"{p}.mlp.experts.{e}.down_proj.weight", (h, ff), "normal", ff**-0.5),
            ]
        out += [
            Spec(f"{p}.mlp.shared_expert.gate_proj.weight", (sff, h), "normal", h**-0.5),
            Spec(f"{p}.mlp.shared_expert.up_proj.weight", (sff, h), "normal", h**-0.5),
            Spec(f"{p}.mlp.shared_expert.down_proj.weight", (h, sff), "normal", sff**-0.5),
            Spec(f"{p}.mlp.shared_expert_gate.weight", (1, h), "normal", h**-0.5),
            Spec(f"{p}.input_layernorm.weight", (h,), "zeros"),
            Spec(f"{p}.post_attention_layernorm.weight", (h,), "zeros"),
        ]
    out += [
        Spec("model.norm.weight", (h,), "zeros"),
        Spec("lm_head.weight", (v, h), "normal", h**-0.5),
    ]
    return out


def qwen35_tensor_specs(cfg: dict) -> list[Spec]:
    """Qwen3_5MoeForCausalLM's tensors (per ../shared/fixtures/qwen3_5_moe),
    in module order: as qwen3_next but DeltaNet's in_proj_qkv
    [2*nk*dk + nv*dv, h], in_proj_z [nv*dv, h], in_proj_b / in_proj_a [nv, h]."""
    return next_tensor_specs(cfg, split_projections=True)


# Biases: small, see the module docstring.
BIAS_STD = 0.02


def gptoss_tensor_specs(cfg: dict) -> list[Spec]:
    """GptOssForCausalLM's tensors as the hub stores them, in the order of
    ../shared/fixtures/gpt_oss_mxfp4's index. Experts per layer: gate_up
    [E, 2I, h] (gate/up interleaved by row) and down [E, h, I] as MXFP4
    pairs over the input dimension, biases [E, 2I] and [E, h]."""
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    hd, nq, nkv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    E, ff = cfg["num_local_experts"], cfg["intermediate_size"]
    if h % 32 or ff % 32:
        raise GenError(f"MXFP4 needs hidden_size {h} and intermediate_size {ff} divisible by 32")
    out = [Spec("model.embed_tokens.weight", (v, h), "normal", 1.0)]
    for L in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{L}"
        a, x = f"{p}.self_attn", f"{p}.mlp.experts"
        out += [
            Spec(f"{a}.sinks", (nq,), "normal", 1.0),
            Spec(f"{a}.q_proj.weight", (nq * hd, h), "normal", h**-0.5),
            Spec(f"{a}.q_proj.bias", (nq * hd,), "normal", BIAS_STD),
            Spec(f"{a}.k_proj.weight", (nkv * hd, h), "normal", h**-0.5),
            Spec(f"{a}.k_proj.bias", (nkv * hd,), "normal", BIAS_STD),
            Spec(f"{a}.v_proj.weight", (nkv * hd, h), "normal", h**-0.5),
            Spec(f"{a}.v_proj.bias", (nkv * hd,), "normal", BIAS_STD),
            Spec(f"{a}.o_proj.weight", (h, nq * hd), "normal", (nq * hd) ** -0.5),
            Spec(f"{a}.o_proj.bias", (h,), "normal", BIAS_STD),
            Spec(f"{p}.mlp.router.weight", (E, h), "router", h**-0.5, L),
            Spec(f"{p}.mlp.router.bias", (E,), "normal", BIAS_STD),
            Spec(f"{x}.gate_up_proj_blocks", (E, 2 * ff, h // 32, 16), "mxfp4_blocks"),
            Spec(f"{x}.gate_up_proj_scales", (E, 2 * ff, h // 32), "mxfp4_scales", h**-0.5),
            Spec(f"{x}.gate_up_proj_bias", (E, 2 * ff), "normal", BIAS_STD),
            Spec(f"{x}.down_proj_blocks", (E, h, ff // 32, 16), "mxfp4_blocks"),
            Spec(f"{x}.down_proj_scales", (E, h, ff // 32), "mxfp4_scales", ff**-0.5),
            Spec(f"{x}.down_proj_bias", (E, h), "normal", BIAS_STD),
            Spec(f"{p}.input_layernorm.weight", (h,), "ones"),
            Spec(f"{p}.post_attention_layernorm.weight", (h,), "ones"),
        ]
    out += [
        Spec("model.norm.weight", (h,), "ones"),
        Spec("lm_head.weight", (v, h), "normal", h**-0.5),
    ]
    return out


def rng_for(seed: int, name: str) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, zlib.crc32(name.encode())])))


def router_scales(seed: int, layer: int, n_experts: int, skew: float) -> np.ndarray:
    """Per-expert row scale (1 + rank)^-skew with a per-layer random rank order."""
    ranks = rng_for(seed, f"router-rank-{layer}").permutation(n_experts)
    return (1.0 + ranks) ** (-skew)


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns, round to nearest even (as torch does)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def materialize(spec: Spec, seed: int, skew: float) -> np.ndarray:
    if spec.kind == "ones":
        return np.full(spec.shape, 0x3F80, dtype=np.uint16)  # bf16 1.0
    if spec.kind == "zeros":
        return np.zeros(spec.shape, dtype=np.uint16)  # bf16 +0.0
    if spec.kind == "alog":
        return bf16_bits(np.log(rng_for(seed, spec.name).uniform(1.0, 16.0, spec.shape)).astype(np.float32))
    if spec.kind.startswith("mxfp4"):
        return np.concatenate([mxfp4_expert(spec, seed, e) for e in range(spec.shape[0])])
    w = rng_for(seed, spec.name).standard_normal(spec.shape, dtype=np.float32)
    w *= np.float32(spec.std)
    if spec.kind == "router":
        w *= router_scales(seed, spec.layer, spec.shape[0], skew).astype(np.float32)[:, None]
    return bf16_bits(w)


# Mean square of the 16 e2m1 values (0, 0.5, 1, 1.5, 2, 3, 4, 6 and negatives),
# i.e. of a uniformly random code.
E2M1_MEAN_SQ = 8.5625


def mxfp4_expert(spec: Spec, seed: int, e: int) -> np.ndarray:
    """Expert e of a hub MXFP4 tensor (its own stream, seeded by (seed, "NAME[e]")).
    Blocks: uniform code bytes. Scales (e8m0, 2^(s - 127)): 2^f or 2^(f + 1)
    with f = floor(x), x = log2(std / sqrt(E2M1_MEAN_SQ)), the larger with
    probability (4^(x - f) - 1) / 3, so the expected mean square of the
    dequantized weights is std^2."""
    rng = rng_for(seed, f"{spec.name}[{e}]")
    if spec.kind == "mxfp4_blocks":
        return rng.integers(0, 256, size=spec.shape[1:], dtype=np.uint8)[None]
    x = float(np.log2(spec.std / np.sqrt(E2M1_MEAN_SQ)))
    f = int(np.floor(x))
    if not 0 <= 127 + f <= 253:
        raise GenError(f"{spec.name}: std {spec.std} is out of e8m0's range")
    up = rng.random(spec.shape[1:]) < (4.0 ** (x - f) - 1.0) / 3.0
    return (127 + f + up).astype(np.uint8)[None]


def chunks(spec: Spec, seed: int, skew: float):
    """The tensor's bytes in order: MXFP4 tensors one expert at a time (their
    per-expert streams make this the same as materialize), others whole."""
    if spec.kind.startswith("mxfp4"):
        for e in range(spec.shape[0]):
            yield mxfp4_expert(spec, seed, e)
    else:
        yield materialize(spec, seed, skew)


def estimate_top25_mass(cfg: dict, seed: int, skew: float, probes: int = 2048) -> list[float]:
    """Share of top-k picks that go to the busiest 25% of experts, per layer,
    for isotropic Gaussian inputs (the router sees RMS-normed hidden states)."""
    E, k, h = num_experts(cfg), cfg["num_experts_per_tok"], cfg["hidden_size"]
    H = rng_for(seed, "probe").standard_normal((probes, h), dtype=np.float32)
    out = []

    def f32(spec: Spec) -> np.ndarray:
        return (materialize(spec, seed, skew).astype(np.uint32) << 16).view(np.float32)

    for L in range(cfg["num_hidden_layers"]):
        r = router_name(cfg, L)
        logits = H @ f32(Spec(f"{r}.weight", (E, h), "router", h**-0.5, L)).T
        if cfg["model_type"] == "gpt_oss":  # the router's bias, as gptoss_tensor_specs draws it
            logits += f32(Spec(f"{r}.bias", (E,), "normal", BIAS_STD))
        top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
        counts = np.sort(np.bincount(top.ravel(), minlength=E))[::-1]
        out.append(round(float(counts[: max(1, E // 4)].sum() / counts.sum()), 4))
    return out


def plan_shards(specs: list[Spec], max_bytes: int) -> list[list[Spec]]:
    """Greedy in-order packing, like save_pretrained's max_shard_size: a tensor
    larger than the limit gets a shard of its own."""
    shards: list[list[Spec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def write_safetensors(path: Path, specs: list[Spec], seed: int, skew: float,
                      metadata: dict | None = None) -> None:
    """Header from shapes first, then tensor bytes one at a time.

    Layout per the safetensors README: u64 LE header length, JSON header
    (padded with spaces to 8 bytes), then the byte buffer fully covered by the
    tensors' data_offsets, in order, without holes.
    """
    header: dict = {"__metadata__": metadata} if metadata is not None else {}
    off = 0
    for s in specs:
        header[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [off, off + s.nbytes]}
        off += s.nbytes
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for s in specs:
            for c in chunks(s, seed, skew):
                c.tofile(f)
    tmp.replace(path)


def write_checkpoint(out: Path, cfg: dict, seed: int, skew: float, shard_bytes: int, meta: dict) -> None:
    specs = tensor_specs(cfg)
    shards = plan_shards(specs, shard_bytes)
    n = len(shards)
    out.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    total = sum(s.nbytes for s in specs)
    gpt_oss = cfg["model_type"] == "gpt_oss"
    t0 = time.time()
    done = 0
    for i, shard in enumerate(shards, 1):
        if gpt_oss:
            # openai/gpt-oss's shard names are 0-based: model-00000-of-00014
            # .. model-00014-of-00014; its headers have no __metadata__.
            fname = f"model-{i - 1:05d}-of-{n - 1:05d}.safetensors"
        else:
            fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        write_safetensors(out / fname, shard, seed, skew, None if gpt_oss else {"format": "pt"})
        for s in shard:
            weight_map[s.name] = fname
        done += sum(s.nbytes for s in shard)
        print(f"[gen_synthetic] {fname} ({done / 2**30:.2f}/{total / 2**30:.2f} GiB, "
              f"{time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
    index_meta: dict = {"total_size": total}
    if cfg["model_type"] == "qwen3_5_moe_text":  # as transformers 5 writes it
        index_meta = {"total_parameters": sum(s.params for s in specs), "total_size": total}
    index = {"metadata": index_meta, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [2, 0], "pad_token_id": 0, "do_sample": False}, indent=2) + "\n")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        src = SHARED_TOKENIZER_DIR / f
        if not src.is_file():
            raise GenError(f"{src}: missing; the synthetic model reuses the shared tiny model's tokenizer")
        shutil.copyfile(src, out / f)
    (out / "synthetic.json").write_text(json.dumps(meta, indent=2) + "\n")


def run(cmd: list[str]) -> None:
    print("[gen_synthetic] $ " + " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description="Write a synthetic MoE checkpoint (HF layout, optional GGUF).")
    ap.add_argument("--preset", choices=sorted(ALL_PRESETS), required=True)
    ap.add_argument("--layers", type=int, help="cut the preset's layer count (disk space)")
    ap.add_argument("--skew", type=float, default=0.35, help="router skew exponent, 0 = uniform (default 0.35)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-shard-bytes", type=int,
                    help="shard size limit (default: 2e9, ci-small 8 MiB, qwen3-next-small 2 MiB)")
    ap.add_argument("-o", "--out", type=Path, help="output directory (must not exist or be empty)")
    ap.add_argument("--dry-run", action="store_true", help="print the config and sizes, write nothing")
    ap.add_argument("--gguf", action="store_true", help="also write OUT/../NAME-bf16.gguf via scripts/hf_to_gguf.py")
    ap.add_argument("--q4_0", action="store_true", help="also write NAME-q4_0.gguf with llama-quantize (implies --gguf)")
    ap.add_argument("--llama-bin", type=Path, default=PEERS / "llama.cpp" / "bin")
    a = ap.parse_args()
    try:
        if a.skew < 0:
            raise GenError(f"--skew {a.skew}: must be >= 0")
        if a.dry_run:
            cfg = hub_config(a.preset, a.layers)
            specs = tensor_specs(cfg)
            experts = sum(s.nbytes for s in specs if ".experts." in s.name)
            total = sum(s.nbytes for s in specs)
            params = sum(s.params for s in specs)
            mx = " (experts MXFP4, the rest bf16)" if any(s.dtype == "U8" for s in specs) else " bf16"
            print(json.dumps(cfg, indent=2))
            print(f"[gen_synthetic] {a.preset}: {len(specs)} tensors, {params / 1e9:.2f} B params, "
                  f"{total / 2**30:.2f} GiB{mx} ({experts / 2**30:.2f} GiB routed experts)", file=sys.stderr)
            return
        if a.out is None:
            raise GenError("-o/--out is required (or --dry-run)")
        if (a.gguf or a.q4_0) and a.preset not in PRESETS:
            raise GenError(f"--gguf/--q4_0: scripts/hf_to_gguf.py converts qwen3_moe only, not {a.preset}")
        if a.out.exists() and any(a.out.iterdir()):
            raise GenError(f"{a.out}: exists and is not empty")
        cfg = hub_config(a.preset, a.layers)
        shard_bytes = a.max_shard_bytes or PRESET_SHARD_BYTES[a.preset]
        mass = estimate_top25_mass(cfg, a.seed, a.skew)
        meta = {
            "generator": "scripts/gen_synthetic.py",
            "preset": a.preset, "layers": cfg["num_hidden_layers"], "seed": a.seed, "skew": a.skew,
            "router_row_scale": "(1 + rank_L(e)) ** -skew, rank_L a per-layer random permutation",
            "top25_mass_gaussian_probe_per_layer": mass,
            "top25_mass_gaussian_probe_mean": round(float(np.mean(mass)), 4),
        }
        print(f"[gen_synthetic] {a.preset}: {cfg['num_hidden_layers']} layers, skew {a.skew}, "
              f"est. top-25% mass {meta['top25_mass_gaussian_probe_mean']}", file=sys.stderr)
        write_checkpoint(a.out, cfg, a.seed, a.skew, shard_bytes, meta)
        if a.gguf or a.q4_0:
            base = a.out.parent / a.out.name
            bf16 = Path(f"{base}-bf16.gguf")
            run([sys.executable, str(REPO / "scripts" / "hf_to_gguf.py"), str(a.out), str(bf16)])
            if a.q4_0:
                quant = a.llama_bin / "llama-quantize"
                if not quant.exists():
                    raise GenError(f"{quant}: missing; run scripts/build_llamacpp.sh first")
                run([str(quant), str(bf16), f"{base}-q4_0.gguf", "Q4_0", str(os.cpu_count() or 2)])
    except GenError as e:
        sys.exit(f"gen_synthetic.py: {e}")


if __name__ == "__main__":
    main()
