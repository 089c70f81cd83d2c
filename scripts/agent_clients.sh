#!/usr/bin/env bash
# Real agent clients against `mfx serve`, scripted and non-interactive
# (issue 23): Claude Code (npm @anthropic-ai/claude-code, Anthropic
# Messages API) and Codex CLI (npm @openai/codex, OpenAI Responses API).
#
#   scripts/agent_clients.sh            # both clients
#   scripts/agent_clients.sh claude     # one of them (claude | codex)
#
# What it does:
#   1. packs the bundled tiny model (target/tiny.mfx) if missing;
#   2. installs the two clients from npm into target/agent-clients (once;
#      CLAUDE_CODE_VERSION / CODEX_VERSION pin them, default: latest);
#   3. starts `mfx serve` with its context stretched to MFX_AGENT_CONTEXT
#      (default 65536; the tiny model has 4096 positions, agent prompts are
#      20-40K tokens here: the protocol, not the text quality, is under
#      test) and a logging proxy (scripts/agent_proxy.py) in front of it;
#   4. runs each client on one prompt and checks that it exited 0 and that
#      every request it made was answered 2xx with a complete reply.
# Everything sent and received is in target/agent-logs/CLIENT.jsonl (one
# line per exchange), the client's own output in CLIENT.out, the server's
# log in serve.log. The tiny model writes nonsense: a run passes on the
# protocol (the client finished its turn), not on what the text says.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
which=${1:-all}
logs="$root/target/agent-logs"
clients="$root/target/agent-clients"
pack="$root/target/tiny.mfx"
mfx="$root/target/release/mfx"
ctx=${MFX_AGENT_CONTEXT:-65536}
mkdir -p "$logs"

[ -x "$mfx" ] || cargo build --release --locked --bin mfx
if [ ! -f "$pack" ]; then
  "$mfx" prep models/tiny-qwen3-moe-coder-mlx-4bit --ram 96M -o "$pack"
fi
if [ ! -x "$clients/node_modules/.bin/claude" ] || [ ! -x "$clients/node_modules/.bin/codex" ]; then
  command -v npm >/dev/null || { echo "agent_clients: npm is required (apt-get install nodejs npm)" >&2; exit 1; }
  mkdir -p "$clients"
  (cd "$clients" && [ -f package.json ] || npm init -y >/dev/null)
  (cd "$clients" && npm install --no-audit --no-fund \
    "@anthropic-ai/claude-code@${CLAUDE_CODE_VERSION:-latest}" "@openai/codex@${CODEX_VERSION:-latest}")
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

port=$(free_port)
"$mfx" serve "$pack" --port "$port" --max-context "$ctx" --model-id tiny >"$logs/serve.log" 2>&1 &
pids+=($!)
for _ in $(seq 600); do
  curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
  kill -0 "${pids[0]}" 2>/dev/null || { cat "$logs/serve.log" >&2; exit 1; }
  sleep 0.2
done

# Starts a logging proxy for one client; sets proxy_port. (Not in a `$(...)`:
# the proxy would hold the substitution's pipe open.)
proxy() {
  local name=$1
  proxy_port=$(free_port)
  rm -f "$logs/$name.jsonl"
  python3 "$root/scripts/agent_proxy.py" "$proxy_port" "http://127.0.0.1:$port" "$logs/$name.jsonl" \
    >"$logs/$name.proxy.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 50); do curl -s "http://127.0.0.1:$proxy_port/health" >/dev/null && break; sleep 0.1; done
}

# Every exchange answered 2xx, and each streamed reply ended properly.
check_log() {
  python3 - "$1" "$2" <<'EOF'
import json, sys
path, end = sys.argv[1], sys.argv[2]
entries = [json.loads(l) for l in open(path)]
bad = [e for e in entries if not 200 <= e.get("status", 0) < 300 and e["path"] != "/health"]
for e in bad:
    print(f"  {e['method']} {e['path']} -> {e.get('status')}: {str(e.get('response_body'))[:300]}")
gen = [e for e in entries if e["method"] == "POST" and e["path"].split("?")[0] in ("/v1/messages", "/v1/responses")]
unfinished = [e for e in gen if isinstance(e.get("response_body"), str) and end not in e["response_body"]]
print(f"  {len(entries)} exchanges, {len(gen)} generations, {len(bad)} not 2xx, {len(unfinished)} streams without {end}")
sys.exit(1 if bad or unfinished or not gen else 0)
EOF
}

status=0
run_claude() {
  local p home
  proxy claude
  p=$proxy_port
  home=$(mktemp -d)
  echo "agent_clients: claude -p against mfx serve (via :$p)"
  set +e
  (cd "$home" && HOME="$home" ANTHROPIC_BASE_URL="http://127.0.0.1:$p" ANTHROPIC_API_KEY=dummy \
    DISABLE_AUTOUPDATER=1 DISABLE_TELEMETRY=1 CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1 \
    timeout 1800 "$clients/node_modules/.bin/claude" -p "Say hello in one short sentence." \
      --max-turns 2 --output-format json) >"$logs/claude.out" 2>&1
  local rc=$?
  set -e
  echo "  claude exited $rc; output: $(head -c 400 "$logs/claude.out")"
  check_log "$logs/claude.jsonl" "message_stop" && [ $rc -eq 0 ] || status=1
}

run_codex() {
  local p home
  proxy codex
  p=$proxy_port
  home=$(mktemp -d)
  mkdir -p "$home/.codex" "$home/work"
  cat >"$home/.codex/config.toml" <<EOF
model = "tiny"
model_provider = "mfx"
[model_providers.mfx]
name = "mfx"
base_url = "http://127.0.0.1:$p/v1"
wire_api = "responses"
env_key = "MFX_API_KEY"
EOF
  echo "agent_clients: codex exec against mfx serve (via :$p)"
  set +e
  (cd "$home/work" && HOME="$home" CODEX_HOME="$home/.codex" MFX_API_KEY=dummy \
    timeout 1800 "$clients/node_modules/.bin/codex" exec --skip-git-repo-check \
      "Say hello in one short sentence.") >"$logs/codex.out" 2>&1
  local rc=$?
  set -e
  echo "  codex exited $rc; output tail: $(tail -c 400 "$logs/codex.out")"
  check_log "$logs/codex.jsonl" "response.completed" && [ $rc -eq 0 ] || status=1
}

case $which in
  claude) run_claude ;;
  codex) run_codex ;;
  all) run_claude; run_codex ;;
  *) echo "usage: $0 [claude|codex|all]" >&2; exit 2 ;;
esac
if [ $status -ne 0 ]; then
  echo "agent_clients: FAILED (logs in $logs)" >&2
else
  echo "agent_clients: ok (logs in $logs)"
fi
exit $status
