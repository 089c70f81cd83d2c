#!/usr/bin/env bash
# Resident decode and prefill, mfx against llama.cpp, interleaved round by
# round so that both see the same machine state. On the shared 2-vCPU dev VM
# one engine's tok/s moved 30% between minutes (both engines alike), so
# back-to-back blocks of runs compare machine states, not engines; the
# per-round ratio is the number to read.
#
#   scripts/bench_resident_ab.sh [MFX_BIN]
#
# Env: PACK (the .mfx pack), GGUF (the same weights for llama.cpp), ROUNDS (4),
#      THREADS (2), PP (128), TG (128), LLAMA_BIN (dir with llama-bench),
#      MFX_KERNELS (passed through), MFX_PEERS_DIR (default /work/.peers),
#      LLAMA_ARGS (extra llama-bench arguments, e.g. "--repack 0" where
#      repacking crashes: llama.cpp 0c1e570 did so for every multi-token batch
#      on an AVX-512/AMX Xeon, 2026-12-05).
# llama.cpp runs in its best CPU configuration (weights loaded and repacked:
# llama-bench's defaults); mfx with --ram 16G (everything resident).
#
# Decode depth: `mfx bench` decodes after its PP-token prompt, so its tg runs
# over PP..PP+TG cached positions, while llama-bench's plain tg starts from
# an empty context. llama.cpp's tg is therefore measured twice, at depth 0
# and at depth PP (`-d PP`, the same positions as mfx's); the tg ratio uses
# the like-for-like depth-PP figure, and the depth-0 one is printed beside it.
# Every llama.cpp figure is the faster of flash attention off and on (`-fa
# 0,1`): auto picked it on here, which at depth 2048 decoded 17.5 tok/s
# against 27.7 with it off.
set -euo pipefail
cd "$(dirname "$0")/.."
P=${MFX_PEERS_DIR:-/work/.peers}
MFX_BIN=${1:-${MFX_BIN:-target/release/mfx}}
PACK=${PACK:-$P/models/qwen3-30b-a3b-l8-q4d4-2945M.mfx}
GGUF=${GGUF:-$P/models/qwen3-30b-a3b-l8-q4_0.gguf}
LLAMA_BIN=${LLAMA_BIN:-$P/llama.cpp/bin}
ROUNDS=${ROUNDS:-4} THREADS=${THREADS:-2} PP=${PP:-128} TG=${TG:-128}
echo "round | llama pp$PP | llama tg$TG d0 | llama tg$TG d$PP | mfx pp$PP | mfx tg$TG (d$PP) | pp ratio | tg ratio (d$PP) | tg ratio vs d0 | load"
for i in $(seq "$ROUNDS"); do
    # shellcheck disable=SC2086 # LLAMA_ARGS is a list of words
    l=$({ "$LLAMA_BIN/llama-bench" -m "$GGUF" -t "$THREADS" -p "$PP" -n "$TG" -fa 0,1 -r 1 -o csv ${LLAMA_ARGS:-} || true
          "$LLAMA_BIN/llama-bench" -m "$GGUF" -t "$THREADS" -p 0 -n "$TG" -d "$PP" -fa 0,1 -r 1 -o csv ${LLAMA_ARGS:-} | tail -n +2 || true; } 2>/dev/null \
        | PP="$PP" TG="$TG" python3 -c '
import csv, os, sys
pp, tg = os.environ["PP"], os.environ["TG"]
rows = {}
for r in csv.DictReader(sys.stdin):  # the faster of flash attention off/on
    k = (r["n_prompt"], r["n_gen"], r["n_depth"])
    rows[k] = max(rows.get(k, 0.0), float(r["avg_ts"]))
# A configuration that crashed leaves no row: nan, not a dead script
# (llama.cpp 0c1e570 repacking crashed in prompt processing on an AVX-512/AMX Xeon).
get = lambda k: rows.get(k, float("nan"))
print("%.2f %.2f %.2f" % (get((pp, "0", "0")), get(("0", tg, "0")), get(("0", tg, pp))))')
    m=$("$MFX_BIN" bench "$PACK" --ram 16G --prompt-tokens "$PP" --gen-tokens "$TG" --threads "$THREADS" --json 2>/dev/null \
        | python3 -c 'import json,sys; d=json.load(sys.stdin); print("%.2f %.2f" % (d["prompt_tok_s"], d["decode_tok_s"]))')
    read -r lp lt0 ltd <<<"$l"; read -r mp mt <<<"$m"
    python3 -c "f = float; print('$i | $lp | $lt0 | $ltd | $mp | $mt | %.2f | %.2f | %.2f | $(cut -d' ' -f1 /proc/loadavg)' % (f('$mp')/f('$lp'), f('$mt')/f('$ltd'), f('$mt')/f('$lt0')))"
done
