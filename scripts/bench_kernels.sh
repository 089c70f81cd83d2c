#!/usr/bin/env bash
# Kernel throughput (GB/s of weights, GFLOP/s) per scheme, tier, thread count
# and batch size; compare the cold GB/s with scripts/membw.sh.
# Usage: scripts/bench_kernels.sh [--quick] [--schemes ...] [--shapes ...] [--n ...] [--threads ...] [--tiers ...]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --release -q -p mfx-runtime --example bench_kernels -- "$@"
