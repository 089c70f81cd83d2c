#!/usr/bin/env bash
# Memory bandwidth of this machine (read-sum and memcpy, 1 and 2 threads), the
# bound that decode-time matvec is measured against. Usage: scripts/membw.sh [MIB]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --release -q -p mfx-runtime --example membw -- "${1:-1024}"
