#!/usr/bin/env bash
# The shipped 4-bit model dir from a trained checkpoint, in the same layout
# as models/tiny-qwen3-moe-coder-mlx-4bit: mlx-lm's affine 4-bit, group 64
# (mlx-lm's qwen3_moe quant predicate keeps each router, `mlp.gate`, at 8
# bits, as in the shipped coder), stacked switch_mlp experts.
#
#   scripts/toolmodel/to_mlx4.sh CKPT DEST [PYTHON]
#
# CKPT: the HF checkpoint train.py wrote. DEST must not exist. PYTHON (default
# python3) needs `mlx[cpu]` and `mlx-lm` (PyPI; they work on Linux). Checks
# that the routers came out at 8 bits and the rest at 4, and copies the
# Qwen3-Coder chat template and the generation config across.
set -euo pipefail
ckpt=${1:?usage: to_mlx4.sh CKPT DEST [PYTHON]}
dest=${2:?usage: to_mlx4.sh CKPT DEST [PYTHON]}
py=${3:-python3}
[ -f "$ckpt/config.json" ] || { echo "to_mlx4: $ckpt has no config.json (expected the HF checkpoint from train.py)" >&2; exit 2; }
[ ! -e "$dest" ] || { echo "to_mlx4: $dest exists; give a new folder" >&2; exit 2; }
"$py" -m mlx_lm convert --hf-path "$ckpt" --mlx-path "$dest" -q --q-bits 4 --q-group-size 64
cp "$ckpt/chat_template.jinja" "$dest/chat_template.jinja"
cp "$ckpt/generation_config.json" "$dest/generation_config.json"
# mlx-lm's tokenizer_config is kept (as in the shipped coder; it records
# tool_parser_type qwen3_coder read off the template for mlx_lm.server); its
# stub README is not: the model card goes there instead.
rm -f "$dest/README.md"
"$py" - "$dest" <<'EOF'
import json, sys
c = json.load(open(f"{sys.argv[1]}/config.json"))
q = c.get("quantization") or c.get("quantization_config")
assert q and q["bits"] == 4 and q["group_size"] == 64, f"expected 4-bit group-64 quantization in config.json, got {q}"
gates = {k: v for k, v in q.items() if isinstance(v, dict)}
n = c["num_hidden_layers"]
want = {f"model.layers.{i}.mlp.gate": {"group_size": 64, "bits": 8} for i in range(n)}
assert all(gates.get(k, {}).get("bits") == 8 for k in want), f"routers not at 8 bits: {gates}"
print(f"to_mlx4: {sys.argv[1]}: 4-bit group 64, {len(gates)} per-layer overrides (routers at 8 bits)")
EOF
ls -la "$dest"
