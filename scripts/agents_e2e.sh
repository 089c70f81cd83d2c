#!/usr/bin/env bash
# Real coding-agent clients end to end against `mfx serve` (issue 23):
# Claude Code (npm @anthropic-ai/claude-code, Anthropic Messages API),
# Codex CLI (npm @openai/codex, OpenAI Responses API) and Aider (PyPI
# aider-chat, OpenAI chat completions), each scripted and non-interactive on
# a fixed task that needs one tool round trip.
#
#   scripts/agents_e2e.sh [MODEL] [CLIENT...]     CLIENT: claude codex aider
#
# MODEL defaults to models/tiny-qwen3-moe-coder-mlx-4bit (any directory or
# .mfx pack `mfx serve` takes). Environment: MFX_AGENT_CONTEXT (the context
# given to `mfx serve --max-context`, default 32768: agent prompts are 5-20K
# tokens, above the tiny model's trained 4096 positions; the protocol, not
# the text, is under test there), CLAUDE_CODE_VERSION, CODEX_VERSION,
# AIDER_VERSION (default: latest; a pinned version replaces a cached other
# one), AGENT_TIMEOUT (seconds per client, 900), AGENTS_E2E_INJECT=0 (skip
# the injected-call runs below).
#
# What it does:
#   1. installs the clients once into target/agents-e2e/clients (npm) and
#      target/agents-e2e/aider-venv (pip);
#   2. starts `mfx serve MODEL` and, per client, a logging proxy
#      (scripts/agent_proxy.py) in front of it;
#   3. runs each client in a fresh work directory on its task:
#      claude, codex: "what is the first line of notes.txt" (the line is a
#      random token, so an answer holding it was read through a tool);
#      aider: "create hello.txt containing hi" (aider edits files from the
#      model's edit blocks, not tool calls);
#      claude and codex then run again as claude-inject / codex-inject: the
#      proxy answers their first request itself with a call of the client's
#      own read tool (agent_proxy.py), so the client runs it and sends the
#      result to mfx -- the second-turn protocol is tested even with a
#      model that makes no calls; reported as ROUNDTRIP (injected call),
#      never as PASS; with AGENTS_E2E_FORCE=1 also as claude-forced /
#      codex-forced: the first request goes to mfx with tool_choice set to
#      that tool, so mfx's own tool-call output reaches the client (with
#      constrained decoding its arguments are schema-valid; the model picks
#      them, so the path may be wrong and the tool fail: the failure still
#      goes back to mfx as the tool's result);
#   4. prints per client the HTTP statuses seen, whether a tool call was made
#      and its result fed back, the SSE checks and the final answer
#      (scripts/agents_e2e_report.py), and a verdict:
#        PASS      the tool round trip happened and the task's effect is
#                  there (token in the answer / file content);
#        PROTOCOL  every request answered 2xx with well-formed streams and
#                  the client exited 0, but the model did not complete the
#                  task (what the untrained tiny model gets);
#        FAIL      anything else (a 4xx/5xx, a bad stream, a client error).
# Recordings: target/agents-e2e/<client>.jsonl (every exchange, bodies
# whole), <client>.out (the client's output), serve.log (mfx's access log).
# Exit status: 0 when no client FAILed.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
model=${1:-models/tiny-qwen3-moe-coder-mlx-4bit}
[ $# -gt 0 ] && shift
wanted=("$@")
[ ${#wanted[@]} -gt 0 ] || wanted=(claude codex aider)
out="$root/target/agents-e2e"
clients="$out/clients"
venv="$out/aider-venv"
mfx="$root/target/release/mfx"
ctx=${MFX_AGENT_CONTEXT:-32768}
limit=${AGENT_TIMEOUT:-900}
mkdir -p "$out"

[ -x "$mfx" ] || cargo build --release --locked --bin mfx

# --- install (cached) -------------------------------------------------------
want() { local c; for c in "${wanted[@]}"; do [ "$c" = "$1" ] && return 0; done; return 1; }
# An npm package needs installing when absent, or when a version is pinned
# and the cached one differs.
npm_stale() {
  local pkg=$1 pin=$2 have
  have=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["version"])' \
    "$clients/node_modules/$pkg/package.json" 2>/dev/null) || return 0
  [ -n "$pin" ] && [ "$pin" != latest ] && [ "$pin" != "$have" ]
}
npm_pkgs=()
if want claude && npm_stale @anthropic-ai/claude-code "${CLAUDE_CODE_VERSION:-}"; then
  npm_pkgs+=("@anthropic-ai/claude-code@${CLAUDE_CODE_VERSION:-latest}")
fi
if want codex && npm_stale @openai/codex "${CODEX_VERSION:-}"; then
  npm_pkgs+=("@openai/codex@${CODEX_VERSION:-latest}")
fi
if [ ${#npm_pkgs[@]} -gt 0 ]; then
  command -v npm >/dev/null || { echo "agents_e2e: npm is required (apt-get install nodejs npm)" >&2; exit 1; }
  mkdir -p "$clients"
  [ -f "$clients/package.json" ] || (cd "$clients" && npm init -y >/dev/null)
  start=$(date +%s)
  (cd "$clients" && npm install --no-audit --no-fund "${npm_pkgs[@]}")
  echo "agents_e2e: npm install ${npm_pkgs[*]}: $(( $(date +%s) - start )) s"
fi
aider_have=$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("aider-chat"))' 2>/dev/null || true)
if want aider && { [ -z "$aider_have" ] || { [ -n "${AIDER_VERSION:-}" ] && [ "$AIDER_VERSION" != "$aider_have" ]; }; }; then
  start=$(date +%s)
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "aider-chat${AIDER_VERSION:+==$AIDER_VERSION}"
  echo "agents_e2e: pip install aider-chat: $(( $(date +%s) - start )) s"
fi

# --- server -----------------------------------------------------------------
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pids=()
# Outside this repository, so the clients see no git checkout around them.
scratch=$(mktemp -d "${TMPDIR:-/tmp}/mfx-agents-e2e.XXXXXX")
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$scratch"; }
trap cleanup EXIT

port=$(free_port)
"$mfx" serve "$model" --port "$port" --max-context "$ctx" --model-id mfx-agent >"$out/serve.log" 2>&1 &
pids+=($!)
for _ in $(seq 900); do
  curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
  kill -0 "${pids[0]}" 2>/dev/null || { cat "$out/serve.log" >&2; exit 1; }
  sleep 0.2
done

# Starts a logging proxy for one client; sets proxy_port. (Not in a `$(...)`:
# the proxy would hold the substitution's pipe open.)
proxy() {
  local name=$1 inject=${2:-}
  proxy_port=$(free_port)
  rm -f "$out/$name.jsonl"
  python3 "$root/scripts/agent_proxy.py" "$proxy_port" "http://127.0.0.1:$port" "$out/$name.jsonl" "$inject" \
    >"$out/$name.proxy.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 50); do curl -s "http://127.0.0.1:$proxy_port/health" >/dev/null && break; sleep 0.1; done
}

# A fresh work directory for a client: DIR/repo in a scratch directory
# outside this checkout, DIR/home (its HOME: no user config leaks in) a link
# to one under target/ (Codex refuses helper binaries under /tmp).
workdir() {
  local dir="$scratch/$1"
  rm -rf "$out/home/$1"
  mkdir -p "$dir/repo" "$out/home/$1"
  ln -s "$out/home/$1" "$dir/home"
  echo "$dir"
}

read_task="What is the first line of the file notes.txt? Use a tool to read it, then answer with that line only."
token() { python3 -c 'import secrets; print("mfx-e2e-" + secrets.token_hex(6))'; }

# [inject|forced]: the first reply is the proxy's tool call, or mfx's forced
# one (agent_proxy.py); the run is reported as claude-inject / -forced.
run_claude() {
  local dir tok rc name=claude${1:+-$1}
  dir=$(workdir $name); tok=$(token)
  printf '%s\nsecond line\n' "$tok" >"$dir/repo/notes.txt"
  local inject=""
  [ -z "${1:-}" ] || inject="{\"api\": \"anthropic\", \"name\": \"Read\", \"force\": $([ "$1" = forced ] && echo true || echo false), \"input\": {\"file_path\": \"$dir/repo/notes.txt\"}}"
  proxy $name "$inject"
  echo "agents_e2e: claude $("$clients/node_modules/.bin/claude" --version 2>/dev/null)"
  set +e
  (cd "$dir/repo" && HOME="$dir/home" ANTHROPIC_BASE_URL="http://127.0.0.1:$proxy_port" \
    ANTHROPIC_API_KEY=dummy DISABLE_AUTOUPDATER=1 DISABLE_TELEMETRY=1 \
    CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1 \
    timeout "$limit" "$clients/node_modules/.bin/claude" -p "$read_task" \
      --max-turns 4 --allowedTools "Read,Bash(cat:*),Bash(head:*)" --output-format json) \
    >"$out/$name.out" 2>"$out/$name.err" </dev/null
  rc=$?
  set -e
  python3 "$root/scripts/agents_e2e_report.py" $name "$out" "$rc" --token "$tok" || status=1
}

run_codex() {
  local dir tok rc name=codex${1:+-$1}
  dir=$(workdir $name); tok=$(token)
  printf '%s\nsecond line\n' "$tok" >"$dir/repo/notes.txt"
  mkdir -p "$dir/home/.codex"
  local inject=""
  [ -z "${1:-}" ] || inject="{\"api\": \"responses\", \"name\": \"exec_command\", \"force\": $([ "$1" = forced ] && echo true || echo false), \"input\": {\"cmd\": \"head -n 1 notes.txt\"}}"
  proxy $name "$inject"
  # A custom provider: Codex 0.1xx speaks only the Responses API to it
  # (wire_api = "chat" is refused), env_key names the variable with the key.
  cat >"$dir/home/.codex/config.toml" <<TOML
model = "mfx-agent"
model_provider = "mfx"
# Codex has no metadata for a custom model: its context window (for
# auto-compaction) is what the server was started with.
model_context_window = $ctx
[model_providers.mfx]
name = "mfx"
base_url = "http://127.0.0.1:$proxy_port/v1"
wire_api = "responses"
env_key = "MFX_API_KEY"
TOML
  rm -f "$out/$name.last"
  echo "agents_e2e: $("$clients/node_modules/.bin/codex" --version 2>/dev/null)"
  set +e
  (cd "$dir/repo" && HOME="$dir/home" CODEX_HOME="$dir/home/.codex" MFX_API_KEY=dummy \
    timeout "$limit" "$clients/node_modules/.bin/codex" exec --skip-git-repo-check --ephemeral \
      --sandbox read-only --color never -o "$out/$name.last" "$read_task") \
    >"$out/$name.out" 2>"$out/$name.err" </dev/null
  rc=$?
  set -e
  python3 "$root/scripts/agents_e2e_report.py" $name "$out" "$rc" --token "$tok" --last "$out/$name.last" || status=1
}

run_aider() {
  local dir rc
  dir=$(workdir aider)
  proxy aider
  echo "agents_e2e: aider $("$venv/bin/aider" --version 2>/dev/null)"
  set +e
  # openai/<id> makes litellm use the OpenAI chat API at --openai-api-base;
  # the model is unknown to aider's metadata, hence the warnings flags.
  (cd "$dir/repo" && HOME="$dir/home" OPENAI_API_KEY=dummy LITELLM_LOCAL_MODEL_COST_MAP=True \
    timeout "$limit" "$venv/bin/aider" --model openai/mfx-agent \
      --openai-api-base "http://127.0.0.1:$proxy_port/v1" \
      --no-git --yes-always --no-check-update --no-show-model-warnings --no-analytics \
      --no-pretty --edit-format whole --map-tokens 0 \
      --message "Create a new file hello.txt whose whole content is the single word: hi" hello.txt) \
    >"$out/aider.out" 2>"$out/aider.err" </dev/null
  rc=$?
  set -e
  python3 "$root/scripts/agents_e2e_report.py" aider "$out" "$rc" --file "$dir/repo/hello.txt" --content hi || status=1
}

status=0
for c in "${wanted[@]}"; do
  case $c in
    claude|codex)
      run_$c
      [ "${AGENTS_E2E_INJECT:-1}" = 0 ] || run_$c inject
      [ "${AGENTS_E2E_FORCE:-0}" = 0 ] || run_$c forced ;;
    aider) run_aider ;;
    *) echo "agents_e2e: unknown client $c (claude codex aider)" >&2; exit 2 ;;
  esac
done
echo "agents_e2e: recordings in $out"
exit $status
