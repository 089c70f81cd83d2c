#!/usr/bin/env bash
# Prep one model for several RAM budgets in one run, check every pack, and
# publish them to one Hugging Face hub repo: the "CI pipeline producing
# per-Mac variants". docs/ci/publish.yml runs exactly this script.
#
#   scripts/publish_variants.sh --model DIR --repo ORG/NAME [options]
#
# Steps (each fails the run on error):
#   1. mfx prep MODEL --ram R1,R2,... -o OUT/NAME-{ram}.mfx  (one calibration pass, one pack per budget)
#   2. mfx verify on every pack (every checksum, every blob decodes)
#   3. mfx eval ppl of the bf16 checkpoint and of every pack on each --data file
#      (shared/README.md protocol); writes OUT/NAME-{ram}.quality.json, which
#      mfx push puts into manifest.json; fails if a pack's NLL exceeds the
#      checkpoint's by more than --max-delta-nll on any file
#   4. optionally (--check-determinism) preps again into a scratch folder and
#      requires byte-identical packs: what lets a re-run publish no change
#   5. mfx push OUT/*.mfx --repo ORG/NAME, or with --no-push
#      `mfx push --dry-run` (no hf, no network) writing OUT/manifest.json
#
# Options:
#   --model DIR           checkpoint folder (Hugging Face or MLX layout) [required]
#   --repo ORG/NAME       hub repo to publish to [required]
#   --ram LIST            budgets [16G,32G,64G]
#   --out DIR             output folder [dist]
#   --name NAME           pack file prefix [the model folder's name]
#   --data FILE           text for mfx eval ppl; repeat for several domains
#                         [../shared/data/{python,docs}.val.txt when present]
#   --rows N --ctx N      eval size [8 rows x 256 tokens]
#   --max-delta-nll X     quality gate in nats/token [0.5]
#   --check-determinism   prep twice and compare bytes
#   --no-eval             skip step 3 (no quality gate, no quality in the manifest);
#                         for a checkpoint too large to evaluate on this machine
#   --revision REV        branch to push to [main]
#   --private             create the repo private
#   --no-push, --dry-run  do everything but upload
#   --mfx PATH            mfx binary [target/release/mfx if built, else mfx on PATH]
#   --prep-arg ARG        extra argument for mfx prep (repeatable), e.g. --prep-arg --calib-rows=4
set -euo pipefail

die() { echo "publish_variants: $*" >&2; exit 1; }

model="" repo="" ram="16G,32G,64G" out="dist" name="" rows=8 ctx=256 max_delta="0.5"
revision="main" private=0 push=1 check_det=0 eval=1 mfx=""
data=() prep_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model="$2"; shift 2 ;;
    --repo) repo="$2"; shift 2 ;;
    --ram) ram="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --name) name="$2"; shift 2 ;;
    --data) data+=("$2"); shift 2 ;;
    --rows) rows="$2"; shift 2 ;;
    --ctx) ctx="$2"; shift 2 ;;
    --max-delta-nll) max_delta="$2"; shift 2 ;;
    --check-determinism) check_det=1; shift ;;
    --no-eval) eval=0; shift ;;
    --revision) revision="$2"; shift 2 ;;
    --private) private=1; shift ;;
    --no-push|--dry-run) push=0; shift ;;
    --mfx) mfx="$2"; shift 2 ;;
    --prep-arg) prep_args+=("$2"); shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
[ -n "$model" ] || die "--model DIR is required"
[ -n "$repo" ] || die "--repo ORG/NAME is required"
[ -d "$model" ] || die "--model $model: no such folder"
root="$(cd "$(dirname "$0")/.." && pwd)"
if [ -z "$mfx" ]; then
  if [ -x "$root/target/release/mfx" ]; then mfx="$root/target/release/mfx"; else mfx="$(command -v mfx || true)"; fi
fi
[ -n "$mfx" ] && [ -x "$mfx" ] || die "no mfx binary: build it (cargo build --release) or pass --mfx PATH"
command -v python3 >/dev/null || die "python3 is needed to assemble the quality JSON"
if [ ${#data[@]} -eq 0 ]; then
  for d in python docs; do
    f="$root/../shared/data/$d.val.txt"
    [ -f "$f" ] && data+=("$f")
  done
  [ ${#data[@]} -gt 0 ] || die "no --data given and ../shared/data not found"
fi
[ -n "$name" ] || name="$(basename "$(cd "$model" && pwd)")"
mkdir -p "$out"
IFS=',' read -r -a labels <<< "$ram"

echo "== 1. prep $model for ${labels[*]}"
"$mfx" prep "$model" --ram "$ram" -o "$out/$name-{ram}.mfx" --report "$out/prep-report.json" ${prep_args[@]+"${prep_args[@]}"}
packs=()
for l in "${labels[@]}"; do
  l="$(echo "$l" | tr -d ' ')"
  p="$out/$name-$l.mfx"
  [ -f "$p" ] || die "prep did not write $p"
  packs+=("$p")
done

echo "== 2. verify"
for p in "${packs[@]}"; do "$mfx" verify "$p"; done

if [ "$eval" = 1 ]; then
echo "== 3. perplexity against the bf16 checkpoint (${rows} rows x ${ctx} tokens per file)"
# `mfx eval ppl` tokenizes --data with the tokenizer.json next to the model;
# give the packs the checkpoint's (push uploads only packs, card and manifest).
[ -f "$out/tokenizer.json" ] || cp "$model/tokenizer.json" "$out/tokenizer.json"
evaljson() { "$mfx" eval ppl "$1" --data "$2" --rows "$rows" --ctx "$ctx" --json; }
ref=()  # parallel to data (no associative arrays: macOS ships bash 3.2)
for f in "${data[@]}"; do
  ref+=("$(evaljson "$model" "$f")")
  echo "  checkpoint $(basename "$f"): ${ref[${#ref[@]}-1]}"
done
for p in "${packs[@]}"; do
  results=()
  for i in "${!data[@]}"; do
    f="${data[$i]}"
    r="$(evaljson "$p" "$f")"
    echo "  $(basename "$p") $(basename "$f"): $r"
    results+=("$(basename "$f" .val.txt)" "${ref[$i]}" "$r")
  done
  python3 - "$p" "$rows" "$ctx" "$max_delta" "${results[@]}" <<'PY'
import json, sys
pack, rows, ctx, max_delta, rest = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5:]
domains, bad = {}, []
for i in range(0, len(rest), 3):
    dom, ref, got = rest[i], json.loads(rest[i + 1]), json.loads(rest[i + 2])
    d = got["nll"] - ref["nll"]
    domains[dom] = {"nll": round(got["nll"], 6), "ppl": round(got["ppl"], 4),
                    "ref_nll": round(ref["nll"], 6), "delta_nll": round(d, 6)}
    if d > max_delta:
        bad.append(f"{dom}: NLL {got['nll']:.4f} vs bf16 {ref['nll']:.4f} (+{d:.4f} > {max_delta})")
q = {"reference": "bf16 checkpoint", "protocol": "shared/README.md val_nll", "rows": rows, "ctx": ctx,
     "domains": domains}
out = pack[: -len(".mfx")] + ".quality.json"
with open(out, "w") as f:
    f.write(json.dumps(q, indent=2, sort_keys=True) + "\n")
if bad:
    sys.exit(f"publish_variants: {pack} fails the quality gate: " + "; ".join(bad))
PY
done
else
  echo "== 3. perplexity skipped (--no-eval)"
  rm -f "$out/$name"-*.quality.json
fi

if [ "$check_det" = 1 ]; then
  echo "== 4. determinism: prep again and compare bytes"
  again="$out/.determinism"
  rm -rf "$again"; mkdir -p "$again"
  "$mfx" prep "$model" --ram "$ram" -o "$again/$name-{ram}.mfx" --no-card -q ${prep_args[@]+"${prep_args[@]}"}
  for p in "${packs[@]}"; do
    cmp "$p" "$again/$(basename "$p")" || die "$(basename "$p") differs between two preps: prep is not deterministic"
    echo "  $(basename "$p"): identical"
  done
  rm -rf "$again"
fi

push_args=("${packs[@]}" --repo "$repo" --revision "$revision")
[ "$private" = 1 ] && push_args+=(--private)
if [ "$push" = 1 ]; then
  echo "== 5. push to $repo"
  "$mfx" push "${push_args[@]}"
else
  echo "== 5. push skipped (--no-push): manifest in $out/manifest.json"
  "$mfx" push "${push_args[@]}" --dry-run > "$out/manifest.json"
fi
echo "publish_variants: done"
