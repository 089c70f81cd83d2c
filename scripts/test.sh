#!/usr/bin/env bash
# The whole test suite, as CI runs it (README's second command).
#
# 1. Rust unit and integration tests with the kernels' best tier for this CPU.
# 2. The kernel-sensitive tests again with MFX_KERNELS=scalar, so the scalar
#    reference path is held to the same transformers parity as the SIMD one.
# 3. The server tests: the real `mfx serve` process driven by the official
#    openai and anthropic Python clients (installed into target/ by run.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR=never
cargo build --release --locked --bin mfx
cargo test --release --locked --workspace
MFX_KERNELS=scalar cargo test --release --locked --workspace -- parity kernels
if [ -x tests/server/run.sh ]; then
  bash tests/server/run.sh
fi
