#!/usr/bin/env bash
# Self-test of the larger-than-RAM benchmark pipeline (scripts/bench_cache.sh
# --self-test), on models of a few MB so it takes seconds, not the hour the
# real run takes:
#   1. qwen3_moe: gen_synthetic.py --preset ci-small (+ Q4_0 GGUF when the
#      llama.cpp peer is built), mfx prep with every expert 4-bit, then
#      bench_cache.sh at 80% and 100% of the pack (cgroups: needs root) and
#      checks that every cell of the table came out and that the 80% budget
#      really is a partial cache (decode hit rate below 100%).
#   2. qwen3_next: gen_synthetic.py --preset qwen3-next-small (the 3 linear :
#      1 full attention pattern) and `mfx run DIR --prompt hi -n 4` on it:
#      the HF-dir path must load the generator's names and shapes.
# Env: MFX_BIN (default target/release/mfx), PY (python with numpy+safetensors;
# default $MFX_PEERS_DIR/venv/bin/python if present, else python3), KEEP=1 keeps
# the temp dir.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
PEERS="${MFX_PEERS_DIR:-/work/.peers}"
MFX_BIN="${MFX_BIN:-$REPO/target/release/mfx}"
if [[ -z "${PY:-}" ]]; then
    PY="$PEERS/venv/bin/python"; [[ -x "$PY" ]] || PY="$(command -v python3)"
fi
LLAMA_BIN="${LLAMA_BIN:-$PEERS/llama.cpp/bin}"
T="$(mktemp -d /tmp/bench-cache-selftest.XXXXXX)"
[[ "${KEEP:-0}" == 1 ]] || trap 'rm -rf "$T"' EXIT
fail() { echo "bench_cache self-test FAILED: $*" >&2; exit 1; }
ok() { echo "bench_cache self-test: ok: $*" >&2; }

[[ -x "$MFX_BIN" ]] || fail "$MFX_BIN: build mfx first (cargo build --release)"

# 2 first: it needs no root and is the faster check.
"$PY" "$HERE/gen_synthetic.py" --preset qwen3-next-small -o "$T/next-small" 2> "$T/gen-next.log" \
    || fail "gen_synthetic.py --preset qwen3-next-small: $(tail -n 3 "$T/gen-next.log")"
"$PY" - "$T/next-small/config.json" <<'EOF' || fail "qwen3-next-small config"
import json, sys
c = json.load(open(sys.argv[1]))
assert c["model_type"] == "qwen3_next", c["model_type"]
assert c["layer_types"] == ["linear_attention"] * 3 + ["full_attention"], c["layer_types"]
assert c["full_attention_interval"] == 4
EOF
"$MFX_BIN" run "$T/next-small" --prompt hi -n 4 > "$T/next-run.out" 2> "$T/next-run.err" \
    || fail "mfx run on qwen3-next-small: $(tail -n 5 "$T/next-run.err")"
grep -q "decode: 4 tok" "$T/next-run.err" || fail "mfx run on qwen3-next-small did not decode 4 tokens: $(cat "$T/next-run.err")"
ok "qwen3-next-small (3 linear + 1 full attention, 32 experts + shared expert) loads and decodes 4 tokens in mfx"

if [[ "$(id -u)" != 0 ]]; then
    echo "bench_cache self-test: not root, skipping the cgroup benchmark part" >&2
    exit 0
fi

"$PY" "$HERE/gen_synthetic.py" --preset ci-small -o "$T/ci-small" 2> "$T/gen.log" || fail "gen ci-small: $(tail -n 3 "$T/gen.log")"
SKIP_LLAMA=1
if [[ -x "$LLAMA_BIN/llama-quantize" ]] && "$PY" -c 'import gguf' 2>/dev/null; then
    "$PY" "$HERE/hf_to_gguf.py" "$T/ci-small" "$T/ci-small-bf16.gguf" > "$T/gguf.log" 2>&1 || fail "hf_to_gguf: $(tail -n 3 "$T/gguf.log")"
    "$LLAMA_BIN/llama-quantize" "$T/ci-small-bf16.gguf" "$T/ci-small-q4_0.gguf" Q4_0 2 >> "$T/gguf.log" 2>&1 || fail "llama-quantize"
    SKIP_LLAMA=0
else
    echo "bench_cache self-test: no llama.cpp peer or gguf-py; llama.cpp rows skipped" >&2
fi
# --pin-mass 0: no pinned experts, so that 80% of this tiny pack (whose dense
# weights are over half of it) still leaves a cache smaller than the experts.
"$MFX_BIN" prep "$T/ci-small" --ram 256M -o "$T/ci.mfx" --hot-fraction 1 --hot-bits 4 --dense-bits 8 \
    --pin-mass 0 --calib-rows 2 --calib-seq 64 --no-card -q > "$T/prep.log" 2>&1 || fail "mfx prep: $(tail -n 5 "$T/prep.log")"

RES="$T/res" PACK="$T/ci.mfx" GGUF="$T/ci-small-q4_0.gguf" SKIP_LLAMA=$SKIP_LLAMA LLAMA_BIN="$LLAMA_BIN" \
    BUDGETS="80 100" MARGIN_MIB=4 CGROUP_EXTRA_MIB=96 TG=8 PP=64 REPS=1 RESIDENT_RAM=1G BENCH_NICE=0 \
    PY="$PY" bash "$HERE/bench_cache.sh" "$MFX_BIN" > "$T/table.md" 2> "$T/bench.log" \
    || fail "bench_cache.sh: $(tail -n 5 "$T/bench.log")"
cat "$T/table.md"
rows=$(grep -c '^| \(mfx\|llama.cpp\) ' "$T/table.md" || true)
want=3; [[ $SKIP_LLAMA == 1 ]] || want=7
[[ "$rows" == "$want" ]] || fail "expected $want table rows, got $rows"
! grep -qE 'failed|not run|oom|\?' "$T/table.md" || fail "a run failed (see the table above; logs in $T/res, KEEP=1)"
"$PY" - "$T/res/mfx-b80-tg.json" "$T/res/mfx-b100-tg.json" <<'EOF' || fail "hit rates"
import json, sys
part, full = (json.load(open(p)) for p in sys.argv[1:])
for j in (part, full):
    for k in ("prompt_tok_s", "decode_tok_s", "ttft_ms", "peak_rss_bytes", "hit_rate", "bytes_read"):
        assert k in j, f"mfx bench --json lacks {k}"
    assert j["decode_tok_s"] > 0
assert part["decode_hit_rate"] < 1.0, f"80% budget should not hold every expert: {part['decode_hit_rate']}"
assert part["decode_bytes_read_per_token"] > 0
assert full["decode_hit_rate"] >= part["decode_hit_rate"]
print(f"80%: decode hit rate {part['decode_hit_rate']:.3f}, {part['decode_bytes_read_per_token'] / 1024:.0f} KiB/token; "
      f"100%: {full['decode_hit_rate']:.3f}", file=sys.stderr)
EOF
ok "bench_cache.sh on ci-small ($rows rows, llama.cpp $([[ $SKIP_LLAMA == 1 ]] && echo skipped || echo included))"
