#!/usr/bin/env bash
# Issue 19: time to first token of a ~4K-token turn cold, from a RAM slot,
# and from a spilled slot on disk (same process, and after a restart).
#
#   PACK=/work/bench-registry/l8-q4.mfx MFX=target/release/mfx scripts/bench_slots.sh
#
# Each number is the wall time of a max_tokens=1 /v1/completions request
# (prefill plus one sampled token, plus HTTP and tokenizing, ~ms), and the
# server's cached_tokens for it. Sessions: A and B are unrelated ~4K-token
# prompts; "A+" is A plus a short follow-up (the next turn). Environment:
# PACK, MFX, TOKENS (approximate prompt length, 4096), EXTRA (more serve
# options, e.g. "--ram 3G").
set -euo pipefail
PACK=${PACK:-/work/bench-registry/l8-q4.mfx}
MFX=${MFX:-target/release/mfx}
TOKENS=${TOKENS:-4096}
EXTRA=${EXTRA:-}
WORK=$(mktemp -d)
trap 'kill $PID 2>/dev/null || true; rm -rf "$WORK"' EXIT
PID=

start() { # start [serve options...]: sets ADDR and PID
  "$MFX" serve "$PACK" --port 0 --max-context $((TOKENS * 2)) --slot-dir "$WORK/slots" $EXTRA "$@" \
    2>"$WORK/log" >/dev/null &
  PID=$!
  for _ in $(seq 600); do
    ADDR=$(grep -o 'http://[0-9.:]*' "$WORK/log" | head -1 | sed 's|http://||') || true
    [ -n "$ADDR" ] && return 0
    kill -0 $PID 2>/dev/null || { cat "$WORK/log"; exit 1; }
    sleep 0.5
  done
  echo "server did not start"; cat "$WORK/log"; exit 1
}

stop() { kill -INT $PID; wait $PID || true; }

text() { # text SEED: ~TOKENS tokens of pseudo-random words
  python3 -c "
import random, sys
r = random.Random(int(sys.argv[1]))
words = 'the of and to in is for on that with as by this be are from at or it an which have can will not use when data file code value list map type call'.split()
print(' '.join(r.choice(words) for _ in range(int(sys.argv[2]))))" "$1" "$TOKENS"
}

turn() { # turn LABEL PROMPT_FILE
  local body t0 t1 out
  body=$(python3 -c "import json,sys; print(json.dumps({'prompt': open(sys.argv[1]).read(), 'max_tokens': 1, 'temperature': 0}))" "$2")
  t0=$(date +%s.%N)
  out=$(curl -s "http://$ADDR/v1/completions" -H 'Content-Type: application/json' -d "$body")
  t1=$(date +%s.%N)
  python3 -c "
import json, sys
u = json.loads(sys.argv[1])['usage']
print(f\"{sys.argv[2]:<28} ttft {float(sys.argv[4]) - float(sys.argv[3]):7.2f} s  prompt {u['prompt_tokens']:5d}  cached {u['prompt_tokens_details']['cached_tokens']:5d}\")" \
    "$out" "$1" "$t0" "$t1"
}

text 1 > "$WORK/a"; text 2 > "$WORK/b"
{ cat "$WORK/a"; echo " and then the next question about the code"; } > "$WORK/a2"

echo "== RAM slots (--prompt-slots 4, default --slot-ram)"
start --prompt-slots 4
turn "A cold" "$WORK/a"
turn "B cold (A to a slot)" "$WORK/b"
turn "A+ from the RAM slot" "$WORK/a2"
stop
rm -rf "$WORK/slots"

echo "== disk spill (--slot-ram 1: every evicted slot goes to disk)"
start --prompt-slots 4 --slot-ram 1
turn "A cold" "$WORK/a"
turn "B cold (A spilled)" "$WORK/b"
turn "A+ restored from disk" "$WORK/a2"
stop
du -sh "$WORK/slots" | sed 's/^/slot dir: /'

echo "== after a restart (slots persisted at Ctrl-C)"
start --prompt-slots 4 --slot-ram 1
turn "B+ restored after restart" "$WORK/b"
stop
