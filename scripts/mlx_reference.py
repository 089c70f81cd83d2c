#!/usr/bin/env python3
"""Record mlx-lm's greedy tokens for the MLX 4-bit tiny model.

This is the outside reference that `tests/it/run.rs` compares mfx against:
mlx-lm's own loader, its own 4-bit kernels, greedy (temp 0) sampling.

Setup (Linux, CPU only):
    python3 -m venv .venv-mlx && .venv-mlx/bin/pip install "mlx[cpu]" mlx-lm
Run from the repository root:
    .venv-mlx/bin/python scripts/mlx_reference.py

Protocol: for each of the five prompts in
../shared/models/tiny-qwen3-moe-coder/reference/reference.json, feed the
recorded prompt token ids as-is (no chat template, no BOS), and take 48 greedy
steps with mlx_lm.generate.generate_step (the loop behind
`mlx_lm generate --temp 0`). EOS does not stop the loop here, so every prompt
has exactly 48 ids; `eos_index` says where `mlx_lm generate` itself would have
stopped (first id in the tokenizer's eos set), so a consumer can compare
either way. `margins` records, per step, the gap between the best and the
second-best logit: a tiny gap flags a step where a different but correct
4-bit kernel could legitimately pick another token.

Two runs per prompt. `generated_ids` is mlx-lm exactly as shipped: it computes
in bf16 (the dtype of the scales), so its logits are rounded to bf16 and
several steps are exact ties (margin 0.0) that argmax settles by index.
`f32.generated_ids` is the same model after `model.set_dtype(mx.float32)`:
identical 4-bit weights (the bf16 scales/biases and norms widen exactly to
f32), f32 activations -- the arithmetic mfx's runtime does, so that is the
sequence mfx's greedy output is expected to equal token for token.
"""
import json
import os
import sys
from importlib.metadata import version

import mlx.core as mx
from mlx_lm import load
from mlx_lm.generate import generate_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared")
MODEL = os.path.join(SHARED, "models", "tiny-qwen3-moe-coder-mlx-4bit")
PROMPTS = os.path.join(SHARED, "models", "tiny-qwen3-moe-coder", "reference", "reference.json")
OUT = os.path.join(ROOT, "tests", "data", "mlx_greedy_4bit.json")
STEPS = 48


def main() -> int:
    mx.set_default_device(mx.cpu)
    model, tokenizer = load(MODEL)
    eos = sorted(int(t) for t in tokenizer.eos_token_ids)
    with open(PROMPTS) as f:
        prompts = json.load(f)["prompts"]

    def greedy(ids):
        out, margins = [], []
        for tok, logprobs in generate_step(mx.array(ids), model, max_tokens=STEPS):
            out.append(int(tok))
            top2 = mx.sort(logprobs.astype(mx.float32))[-2:].tolist()
            margins.append(round(float(top2[1] - top2[0]), 5))
        return out, margins

    cases = {}
    for name, p in prompts.items():
        ids = [int(t) for t in p["ids"]]
        out, margins = greedy(ids)
        eos_index = next((i for i, t in enumerate(out) if t in eos), None)
        stop = eos_index if eos_index is not None else len(out)
        cases[name] = {
            "prompt_ids": ids,
            "generated_ids": out,
            "eos_index": eos_index,
            "text_until_eos": tokenizer.decode(out[:stop]),
            "margins": margins,
        }
        print(f"{name}: {tokenizer.decode(out[:stop])!r}", file=sys.stderr)

    model.set_dtype(mx.float32)
    for name, case in cases.items():
        out, margins = greedy(case["prompt_ids"])
        case["f32"] = {"generated_ids": out, "margins": margins}
        same = next((i for i, (a, b) in enumerate(zip(out, case["generated_ids"])) if a != b), len(out))
        print(f"{name}: f32 run agrees with bf16 run for {same} tokens", file=sys.stderr)

    doc = {
        "model": "../shared/models/tiny-qwen3-moe-coder-mlx-4bit",
        "prompts_from": "../shared/models/tiny-qwen3-moe-coder/reference/reference.json",
        "protocol": "prompt ids as-is, greedy argmax, 48 steps of mlx_lm.generate.generate_step, EOS not stopping; generated_ids in mlx-lm's default bf16 compute, f32.generated_ids after model.set_dtype(float32)",
        "steps": STEPS,
        "eos_token_ids": eos,
        "mlx_version": version("mlx"),
        "mlx_lm_version": version("mlx-lm"),
        "device": "cpu",
        "cases": cases,
    }
    with open(OUT, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"wrote {OUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
