#!/usr/bin/env bash
# End-to-end tests of `mfx serve` with the official openai and anthropic
# Python clients. One command: creates (once) a venv under target/, makes
# sure target/release/mfx exists, runs pytest; the tests start and stop the
# server processes themselves (conftest.py), on free loopback ports.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
venv="$root/target/server-venv"
req="$root/tests/server/requirements.txt"
stamp="$venv/.requirements.sha256"
want=$(sha256sum "$req" | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "tests/server: installing clients into $venv" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
  echo "$want" > "$stamp"
fi
if [ ! -x target/release/mfx ]; then
  cargo build --release --locked --bin mfx
fi
[ -d ../shared/models/tiny-qwen3-moe-coder ] || { echo "tests/server: ../shared/models/tiny-qwen3-moe-coder is missing" >&2; exit 1; }
export MFX_BIN="$root/target/release/mfx"
export MFX_MODEL="$root/../shared/models/tiny-qwen3-moe-coder"
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider "$root/tests/server" "$@"
