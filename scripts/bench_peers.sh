#!/usr/bin/env bash
# Rerun every peer measurement in docs/PERF.md, and mfx's beside them when
# target/release/mfx exists, then print the tables.
#
#   scripts/bench_peers.sh [STEP...]
#
# Steps (default: all, in this order):
#   build      llama.cpp peer (scripts/build_llamacpp.sh) + Python venv
#   machine    lscpu/free/load, memory bandwidth (bench_membw.sh), disk read speed
#   tiny       tiny-qwen3-moe-coder: GGUF bf16/Q4_0/Q4_K_M, greedy check vs transformers,
#              llama-bench pp128/tg128 at -t 1 and -t 2
#   mlx        mlx_lm.benchmark on the shared 4-bit MLX model (CPU), pp128/tg128
#   synthetic  8-layer Qwen3-30B-A3B-shaped checkpoint + bf16/Q4_0 GGUF (gen_synthetic.py)
#   ram        llama.cpp on it, in RAM: repacked (-lm none) and plain mmap (no repack)
#   cgroup     llama.cpp on it under 1400 MiB and 2000 MiB cgroup limits (mmap, no repack):
#              pp128/tg128, and a 2048-token prompt
#   mfx        mfx prep + run on the same models and limits (skipped without target/release/mfx)
#   report     markdown tables from the JSON results (scripts/bench_report.py)
#
# Env: MFX_PEERS_DIR (default /work/.peers; models, venv, llama.cpp, results live there),
#      REPS (llama-bench repetitions, default 3), LIMITS (default "1400M 2000M"),
#      LAYERS (synthetic layer count, default 8), BENCH_NICE (default -10: peers and
#      mfx both run at this nice level, because the 2-core dev machines are shared
#      with compilers and llama.cpp's spinning threads suffer badly from preemption).
# Results: $MFX_PEERS_DIR/results/latest -> results/<UTC stamp>/ (JSON + logs);
#      BENCH_RESULTS=DIR collects several partial runs into one directory.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
source "$HERE/peers_env.sh"

REPS="${REPS:-3}"
LIMITS="${LIMITS:-1400M 2000M}"
LAYERS="${LAYERS:-8}"
BENCH_NICE="${BENCH_NICE:--10}"
B="$PEERS/llama.cpp/bin"
MODELS="$PEERS/models"
PY="$PEERS/venv/bin/python"
TINY_HF="$MFX_SHARED/models/tiny-qwen3-moe-coder"
TINY_MLX="$MFX_SHARED/models/tiny-qwen3-moe-coder-mlx-4bit"
SYN_NAME="qwen3-30b-a3b-l$LAYERS"
SYN_HF="$MODELS/$SYN_NAME"
SYN_Q4="$MODELS/$SYN_NAME-q4_0.gguf"
MFX="$MFX_REPO_ROOT/target/release/mfx"

STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
RES="${BENCH_RESULTS:-$PEERS/results/$STAMP}"
mkdir -p "$RES" "$MODELS"
ln -sfn "$RES" "$PEERS/results/latest"

log() { printf '\n[bench_peers %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
# Every timed command goes through here: same priority for peers and mfx, and
# the load average next to each result, because shared machines are noisy.
timed() {
    local tag="$1"; shift
    echo "$tag $(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg)" >> "$RES/load.log"
    nice -n "$BENCH_NICE" "$@"
}

step_build() {
    log "build llama.cpp"
    bash "$HERE/build_llamacpp.sh" 2>&1 | tail -n 5
    "$B/llama-bench" --version > "$RES/llamacpp_version.txt" 2>&1 || true
}

step_machine() {
    log "machine description, memory bandwidth, disk"
    { lscpu; echo; free -b; echo; uptime; } > "$RES/machine.txt"
    bash "$HERE/bench_membw.sh" "$RES/membw.json" | tee "$RES/membw.txt"
    local big="$SYN_HF-bf16.gguf"; [[ -f "$big" ]] || big="$TINY_HF"
    "$PY" "$HERE/bench_disk.py" "$big" > "$RES/disk.json" || true
}

step_tiny() {
    log "tiny-qwen3-moe-coder: GGUFs, reference check, llama-bench"
    local base="$MODELS/tiny-qwen3-moe-coder"
    [[ -f "$base-bf16.gguf" ]] || "$PY" "$HERE/hf_to_gguf.py" "$TINY_HF" "$base-bf16.gguf"
    for q in Q4_0 Q4_K_M; do
        local lq="${q,,}"
        [[ -f "$base-$lq.gguf" ]] || "$B/llama-quantize" "$base-bf16.gguf" "$base-$lq.gguf" "$q" 2 > "$RES/quantize-tiny-$lq.log" 2>&1
    done
    for q in bf16 q4_0 q4_k_m; do
        "$PY" "$HERE/check_llamacpp_reference.py" "$base-$q.gguf" | tail -n 1 > "$RES/tiny-$q-greedy.json"
        timed "tiny-$q" "$B/llama-bench" -m "$base-$q.gguf" -p 128 -n 128 -t 1,2 -r "$REPS" -o json \
            > "$RES/tiny-$q-bench.json" 2> "$RES/tiny-$q-bench.err"
    done
}

step_mlx() {
    log "mlx-lm on CPU: tiny 4-bit model"
    timed mlx "$PY" -m mlx_lm benchmark --model "$TINY_MLX" -p 128 -g 128 -n "$REPS" > "$RES/mlx-tiny.txt" 2>&1 || true
    "$PY" - "$TINY_MLX" > "$RES/mlx-tiny-generate.txt" 2>&1 <<'EOF' || true
import sys
from mlx_lm import load, generate
model, tok = load(sys.argv[1])
print(generate(model, tok, "def quicksort(arr):\n", max_tokens=48, verbose=False))
EOF
}

step_synthetic() {
    log "synthetic $SYN_NAME (skip if present)"
    if [[ ! -f "$SYN_HF/config.json" ]]; then
        "$PY" "$HERE/gen_synthetic.py" --preset qwen3-30b-a3b --layers "$LAYERS" -o "$SYN_HF" --gguf
    fi
    [[ -f "$SYN_Q4" ]] || "$B/llama-quantize" "$SYN_HF-bf16.gguf" "$SYN_Q4" Q4_0 2 > "$RES/quantize-syn.log" 2>&1
    stat -c '%s %n' "$SYN_Q4" "$SYN_HF-bf16.gguf" > "$RES/synthetic-sizes.txt"
    cp "$SYN_HF/synthetic.json" "$RES/synthetic.json"
}

step_ram() {
    log "llama.cpp in RAM on $SYN_NAME Q4_0"
    timed ram-repack "$B/llama-bench" -m "$SYN_Q4" -p 128 -n 128 -t 2,1 -r "$REPS" -lm none --repack 1 -o json \
        > "$RES/syn-ram-repack.json" 2> "$RES/syn-ram-repack.err"
    timed ram-mmap "$B/llama-bench" -m "$SYN_Q4" -p 128 -n 128 -t 2,1 -r "$REPS" -lm mmap --repack 0 -o json \
        > "$RES/syn-ram-mmap.json" 2> "$RES/syn-ram-mmap.err"
}

step_cgroup() {
    for lim in $LIMITS; do
        log "llama.cpp under a $lim cgroup on $SYN_NAME Q4_0 (mmap, no repack)"
        # Repack copies weights into anonymous memory, which cannot be larger than
        # the limit; plain mmap is llama.cpp's larger-than-RAM mode.
        timed "cg$lim-tg" bash "$HERE/cgroup_run.sh" --evict "$SYN_Q4" --report "$RES/syn-cg$lim-tg.mem.json" "$lim" -- \
            "$B/llama-bench" -m "$SYN_Q4" -p 128 -n 128 -t 2 -r 1 -lm mmap --repack 0 -o json \
            > "$RES/syn-cg$lim-tg.json" 2> "$RES/syn-cg$lim-tg.err" || true
        timed "cg$lim-pp2048" bash "$HERE/cgroup_run.sh" --evict "$SYN_Q4" --report "$RES/syn-cg$lim-pp2048.mem.json" "$lim" -- \
            "$B/llama-bench" -m "$SYN_Q4" -p 2048 -n 0 -t 2 -r 1 --no-warmup -lm mmap --repack 0 -o json \
            > "$RES/syn-cg$lim-pp2048.json" 2> "$RES/syn-cg$lim-pp2048.err" || true
    done
    log "llama.cpp 2048-token prompt in RAM (for the ratio)"
    timed ram-pp2048 "$B/llama-bench" -m "$SYN_Q4" -p 2048 -n 0 -t 2 -r 1 -lm none --repack 1 -o json \
        > "$RES/syn-ram-pp2048.json" 2> "$RES/syn-ram-pp2048.err" || true
}

# mfx side. Uses only the CLI (prep/run); its one-line timing summary on stderr
# ("prompt: N tok, X tok/s | decode: N tok, Y tok/s | peak RSS Z MiB") is kept
# verbatim in the .err files and parsed by bench_report.py.
# MFX_PREP_ARGS: extra `mfx prep` flags for the synthetic model (default: a
# small calibration set, since its weights are random anyway).
step_mfx() {
    if [[ ! -x "$MFX" ]]; then
        log "no $MFX: build it with cargo build --release; skipping mfx"
        return 0
    fi
    log "mfx on the same models"
    # Prompts of exactly 128 and 2048 tokens of real text (shared tokenizer), so
    # mfx's "prompt" tok/s lines up with llama-bench's pp128/pp2048 (which feed
    # random tokens; the speed is the same) and "decode" with tg128 (mfx decodes
    # after the 128-token prompt, llama-bench from an empty context).
    local n
    for n in 128 2048; do
        "$PY" "$HERE/prompt_tokens.py" "$TINY_HF/tokenizer.json" "$MFX_SHARED/data/python.val.txt" "$n" \
            > "$RES/prompt$n.txt"
    done
    local prompt long
    prompt="$(cat "$RES/prompt128.txt")"; long="$(cat "$RES/prompt2048.txt")"
    for t in 1 2; do
        RAYON_NUM_THREADS=$t timed "mfx-tiny-bf16-t$t" "$MFX" run "$TINY_HF" -p "$prompt" -n 128 --temp 0 --ignore-eos \
            > "$RES/mfx-tiny-bf16-t$t.out" 2> "$RES/mfx-tiny-bf16-t$t.err" || true
    done
    local tiny_pack="$MODELS/tiny-qwen3-moe-coder.mfx"
    [[ -f "$tiny_pack" ]] || "$MFX" prep "$TINY_HF" --ram 1G -o "$tiny_pack" > "$RES/mfx-prep-tiny.log" 2>&1 || true
    # Same greedy check as the peers' (transformers reference, 5 prompts x 48 tokens).
    "$PY" "$HERE/check_llamacpp_reference.py" --mfx "$MFX" "$TINY_HF" 2>&1 | tail -n 1 > "$RES/mfx-tiny-bf16-greedy.json" || true
    [[ -f "$tiny_pack" ]] && { "$PY" "$HERE/check_llamacpp_reference.py" --mfx "$MFX" "$tiny_pack" 2>&1 \
        | tail -n 1 > "$RES/mfx-tiny-pack-greedy.json" || true; }
    if [[ -f "$tiny_pack" ]]; then
        for t in 1 2; do
            RAYON_NUM_THREADS=$t timed "mfx-tiny-pack-t$t" "$MFX" run "$tiny_pack" -p "$prompt" -n 128 --temp 0 --ignore-eos \
                > "$RES/mfx-tiny-pack-t$t.out" 2> "$RES/mfx-tiny-pack-t$t.err" || true
        done
    fi
    for lim in $LIMITS; do
        local pack="$MODELS/$SYN_NAME-$lim.mfx"
        if [[ ! -f "$pack" ]]; then
            # shellcheck disable=SC2086
            timed "mfx-prep-$lim" /usr/bin/time -v "$MFX" prep "$SYN_HF" --ram "$lim" -o "$pack" \
                ${MFX_PREP_ARGS:---calib-rows 2 --calib-seq 256} > "$RES/mfx-prep-syn-$lim.log" 2>&1 || true
        fi
        [[ -f "$pack" ]] || { log "mfx prep for $lim failed: see $RES/mfx-prep-syn-$lim.log"; continue; }
        RAYON_NUM_THREADS=2 timed "mfx-cg$lim-tg" bash "$HERE/cgroup_run.sh" --evict "$pack" \
            --report "$RES/mfx-syn-cg$lim-tg.mem.json" "$lim" -- \
            "$MFX" run "$pack" -p "$prompt" -n 128 --temp 0 --ignore-eos \
            > "$RES/mfx-syn-cg$lim-tg.out" 2> "$RES/mfx-syn-cg$lim-tg.err" || true
        RAYON_NUM_THREADS=2 timed "mfx-cg$lim-pp2048" bash "$HERE/cgroup_run.sh" --evict "$pack" \
            --report "$RES/mfx-syn-cg$lim-pp2048.mem.json" "$lim" -- \
            "$MFX" run "$pack" -p "$long" -n 1 --temp 0 --ignore-eos \
            > "$RES/mfx-syn-cg$lim-pp2048.out" 2> "$RES/mfx-syn-cg$lim-pp2048.err" || true
    done
}

step_report() {
    "$PY" "$HERE/bench_report.py" "$RES" | tee "$RES/report.md"
}

STEPS=("$@")
[[ ${#STEPS[@]} -gt 0 ]] || STEPS=(build machine tiny mlx synthetic ram cgroup mfx report)
ensure_venv
for s in "${STEPS[@]}"; do
    declare -F "step_$s" >/dev/null || { echo "unknown step $s" >&2; exit 2; }
    "step_$s"
done
log "results in $RES"
