#!/usr/bin/env bash
# Speculative decoding (prompt lookup) with and without, in one interleaved
# run, on a code-copying workload: a prompt holding a file twice and the
# start of a third copy, greedy. Prints a markdown table: decode tok/s per
# mode (median of REPS rounds), the ratio to no drafting, draft acceptance,
# bytes read per token (packs), and whether every mode gave the same text.
#
#   scripts/bench_spec.sh MODEL [MODEL_FLAGS...]
#
# MODEL: a checkpoint directory (resident) or a .mfx pack (add e.g.
# `--ram 40M` to stream, or run the whole script under scripts/cgroup_run.sh).
# Env: MFX (default target/release/mfx), REPS (5), N (tokens, 200),
# DRAFT (8), FILE (the file copied; default scripts/sim_cache.py lines 1-40),
# MODES ("off auto always").
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:?usage: bench_spec.sh MODEL [FLAGS...]}
shift
MFX=${MFX:-target/release/mfx}
REPS=${REPS:-5}
N=${N:-200}
DRAFT=${DRAFT:-8}
MODES=${MODES:-off auto always}
SRC=${FILE:-scripts/sim_cache.py}
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT

body=$(sed -n 1,40p "$SRC")
prompt="# file: a.py
$body

# file: b.py (a copy of a.py)
$body

# file: c.py (a copy of b.py)
$(sed -n 1,2p "$SRC")"

flags_for() {
  case $1 in
    off) echo "--draft 0" ;;
    auto) echo "--draft $DRAFT" ;;
    always) echo "--draft $DRAFT --draft-always" ;;
  esac
}

for r in $(seq "$REPS"); do
  for m in $MODES; do
    # shellcheck disable=SC2046
    "$MFX" run "$MODEL" -p "$prompt" -n "$N" --temp 0 --ignore-eos --stats $(flags_for "$m") "$@" \
      > "$T/$m.$r.out" 2> "$T/$m.$r.err"
  done
done

python3 - "$T" "$REPS" "$MODES" <<'PY'
import re, statistics, sys, pathlib
t, reps, modes = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split()
rows, base, texts = [], None, {}
for m in modes:
    tps, acc, bpt = [], [], []
    for r in range(1, reps + 1):
        err = (t / f"{m}.{r}.err").read_text()
        texts.setdefault(m, set()).add((t / f"{m}.{r}.out").read_text())
        d = re.search(r"decode: (\d+) tok, ([\d.]+) tok/s", err)
        tps.append(float(d.group(2)))
        a = re.search(r"draft: (\d+)/(\d+) accepted .*? in (\d+) passes", err)
        acc.append((int(a.group(1)), int(a.group(2)), int(a.group(3))) if a else (0, 0, 0))
        b = re.search(r"read ([\d.]+) (KiB|MiB|GiB) in", err)
        if b:
            mult = {"KiB": 1 / 1024, "MiB": 1, "GiB": 1024}[b.group(2)]
            bpt.append(float(b.group(1)) * mult / int(d.group(1)))
    med = statistics.median(tps)
    base = base or med
    a = acc[-1]
    rows.append((m, med, min(tps), max(tps), med / base, a, statistics.median(bpt) if bpt else None))
same = len({x for s in texts.values() for x in s}) == 1
print("| drafting | decode tok/s (median, min-max) | vs off | accepted/drafted (passes) | MiB read per token |")
print("| --- | ---: | ---: | ---: | ---: |")
for m, med, lo, hi, ratio, a, b in rows:
    acc = f"{a[0]}/{a[1]} ({a[2]})" if a[1] else "-"
    print(f"| {m} | {med:.1f} ({lo:.1f}-{hi:.1f}) | {ratio:.2f}x | {acc} | {'-' if b is None else f'{b:.3f}'} |")
print(f"\nsame text in every mode and round: {'yes' if same else 'NO'}")
if not same:
    sys.exit(1)
PY
