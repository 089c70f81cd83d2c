#!/usr/bin/env bash
# One call on the GPU machine: synthetic data, fine-tune, self-eval, save.
#
#   bash scripts/toolmodel/run_device.sh
#
# Runs from the repository root. Needs (carried, ignored by git):
#   .toolmodel/base/  the base checkpoint (a copy of ../shared/models/tiny-qwen3-moe-coder)
#   .toolmodel/data/  optional: ../shared/data/*.val.txt, the base's code/prose mix
#                     (without it gen_data.py uses the repository's own *.py/*.rs)
# Writes into $OUT (default ./toolmodel-out): the checkpoint
# tiny-qwen3-moe-coder-tools/ (HF layout, bf16, train_log.json inside) and
# gen_data.log, train.log.
#
# The whole call must end within ~9 minutes: training stops on its own
# wall-clock guard so that it has saved and self-evaluated by about
# TOTAL_BUDGET seconds after this script started (default 450 s = 7.5 min).
# Knobs (environment): N_CONV conversations (default 40000), TOTAL_BUDGET,
# STEPS (an upper bound; the time guard normally ends training first),
# BATCH_TOKENS, MAX_LEN, EVAL_N, EVAL_MAX_NEW, VAL_N, LOG_EVERY, PYTHON,
# TOOLMODEL_BASE, GEN_ARGS and TRAIN_ARGS (extra flags for gen_data.py and
# train.py). Stage 2 (context extension of the stage-1 checkpoint):
#   TOOLMODEL_BASE=.toolmodel/stage1 N_CONV=4000 MAX_LEN=32768 \
#   GEN_ARGS="--stage 2" TRAIN_ARGS="--lr 3e-4 --warmup 30 --max-positions 32768" bash ...
set -euo pipefail
start=$(date +%s)
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/toolmodel-out}
mkdir -p "$OUT"
BASE=${TOOLMODEL_BASE:-.toolmodel/base}
DATA=${TOOLMODEL_DATA_DIR:-/tmp/toolmodel-data}
N_CONV=${N_CONV:-40000}
TOTAL_BUDGET=${TOTAL_BUDGET:-450}
# Reserved after training: final validation, save, self-eval (~200
# greedy completions), with margin.
TAIL_RESERVE=${TAIL_RESERVE:-75}
STEPS=${STEPS:-20000}
BATCH_TOKENS=${BATCH_TOKENS:-32768}
MAX_LEN=${MAX_LEN:-3072}
EVAL_N=${EVAL_N:-200}
EVAL_MAX_NEW=${EVAL_MAX_NEW:-200}
VAL_N=${VAL_N:-128}
PY=${PYTHON:-python3}

[ -f "$BASE/config.json" ] || { echo "run_device: no base checkpoint at $BASE (copy ../shared/models/tiny-qwen3-moe-coder there and carry .toolmodel)" >&2; exit 2; }
{
  date -u
  nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c 'import torch, transformers, tokenizers, jinja2, safetensors; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "transformers", transformers.__version__, "jinja2", jinja2.__version__)'
  git log -1 --format='commit %H %s' 2>/dev/null || true
} 2>&1 | tee "$OUT/env.log"

"$PY" scripts/toolmodel/gen_data.py --out "$DATA" --n "$N_CONV" --code-dir .toolmodel/data ${GEN_ARGS:-} 2>&1 | tee "$OUT/gen_data.log"

now=$(date +%s)
budget=$(( TOTAL_BUDGET - (now - start) - TAIL_RESERVE ))
[ "$budget" -gt 30 ] || budget=30
echo "run_device: data ready after $(( now - start ))s; training for at most ${budget}s" | tee -a "$OUT/env.log"

# The hard stop is a backstop only (the time guard inside train.py ends
# training and saves first); 540 s after the start leaves the call inside 9 min.
hard=$(( ${HARD_STOP:-540} - (now - start) ))
timeout --signal=TERM "$hard" "$PY" -u scripts/toolmodel/train.py \
  --base "$BASE" --data "$DATA" --out "$OUT/tiny-qwen3-moe-coder-tools" \
  --steps "$STEPS" --time-budget "$budget" --batch-tokens "$BATCH_TOKENS" --max-len "$MAX_LEN" \
  --eval-n "$EVAL_N" --eval-max-new "$EVAL_MAX_NEW" --val-n "$VAL_N" --log-every "${LOG_EVERY:-50}" --val-every 500 ${TRAIN_ARGS:-} 2>&1 | grep --line-buffered -v "Loading weights\|Writing model shards" | tee "$OUT/train.log"
echo "run_device: finished in $(( $(date +%s) - start ))s" | tee -a "$OUT/train.log"

# The device tool returns at most 8 files of 16 MiB each (64 MiB in all):
# the weights travel as ~12 MB shards plus their index, everything else
# (logs, config, tokenizer, template, train_log.json) as one tarball. Here:
#   tar xzf meta.tgz && mv model-*.safetensors model.safetensors.index.json tiny-qwen3-moe-coder-tools/
ck="$OUT/tiny-qwen3-moe-coder-tools"
if [ -d "$ck" ]; then
  (cd "$OUT" && tar czf meta.tgz --exclude='*.safetensors' --exclude='model.safetensors.index.json' \
     env.log gen_data.log train.log tiny-qwen3-moe-coder-tools \
   && mv "$ck"/model*.safetensors "$ck"/model.safetensors.index.json "$OUT"/ \
   && rm -rf "$ck" env.log gen_data.log train.log)
  ls -la "$OUT"
fi
