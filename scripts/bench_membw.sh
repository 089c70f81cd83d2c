#!/usr/bin/env bash
# Memory bandwidth of this machine, so decode speed can be stated as a fraction
# of the bound (a memory-bound decoder cannot beat bytes_touched_per_token / BW).
#
# Two independent measurements:
#   * sysbench memory (Debian package): sequential read and write, 1 and 2
#     threads. Each sysbench thread loops over one buffer of --memory-block-size,
#     so the block must be far larger than the L3 (32 MiB here) or it measures
#     cache: 512 MiB.
#   * numpy: a 1 GiB array copy (counts read + write bytes) and a 1 GiB sum
#     (read only), best of 5, single thread - closest to what a streaming
#     matvec does.
# Usage: bench_membw.sh [OUT.json]
set -euo pipefail
source "$(dirname "$0")/peers_env.sh"
OUT="${1:-}"

command -v sysbench >/dev/null || { apt-get install -y -qq sysbench >/dev/null 2>&1 || true; }

declare -A R
if command -v sysbench >/dev/null; then
    for op in read write; do
        for t in 1 2; do
            v="$(sysbench memory --memory-block-size=512M --memory-total-size=1T --memory-oper="$op" \
                 --memory-access-mode=seq --threads="$t" --time=10 run 2>/dev/null \
                 | awk '/MiB transferred/ { gsub(/[()]/, "", $4); print $4 }')"
            R["sysbench_${op}_t${t}_MiBps"]="$v"
            echo "sysbench memory $op seq 512M-block threads=$t: $v MiB/s"
        done
    done
else
    echo "sysbench not available; skipping" >&2
fi

PY="${PEERS}/venv/bin/python"; [[ -x "$PY" ]] || PY=python3
NP="$(OMP_NUM_THREADS=1 "$PY" - <<'EOF'
import time, numpy as np
n = 1 << 30
a = np.ones(n // 8, dtype=np.float64); b = np.empty_like(a)
def best(f):
    f(); t = min(timeit(f) for _ in range(5)); return t
def timeit(f):
    t0 = time.perf_counter(); f(); return time.perf_counter() - t0
tc = best(lambda: np.copyto(b, a))
ts = best(lambda: a.sum())
print(f"{2 * n / tc / 2**20:.0f} {n / ts / 2**20:.0f}")
EOF
)"
read -r COPY SUM <<<"$NP"
R[numpy_copy_rw_MiBps]="$COPY"; R[numpy_sum_read_MiBps]="$SUM"
echo "numpy 1 GiB copy (read+write bytes): $COPY MiB/s; 1 GiB sum (read): $SUM MiB/s"

if [[ -n "$OUT" ]]; then
    {
        echo "{"
        first=1
        for k in "${!R[@]}"; do
            [[ $first == 1 ]] || echo ","
            printf '  "%s": %s' "$k" "${R[$k]:-null}"; first=0
        done
        echo; echo "}"
    } > "$OUT"
fi
