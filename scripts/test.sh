#!/usr/bin/env bash
# The whole test suite, as CI runs it (README's second command).
#
# 0. The release mfx must hold no x86 intrinsic as an out-of-line call
#    (scripts/check_intrinsics.sh says why).
# 1. Rust unit and integration tests with the kernels' best tier for this CPU.
# 2. The parity tests again with MFX_KERNELS=scalar, so the scalar reference
#    path is held to the same transformers parity as the SIMD one (the kernel
#    tests in runtime/tests/kernels.rs already run every tier in leg 1).
#    Then clippy on every target, warnings as errors.
# 3. The server tests: the real `mfx serve` process driven by the official
#    openai and anthropic Python clients (installed into target/ by run.sh).
# 4. aarch64: the kernel-sensitive suites cross-built and run under
#    qemu-aarch64 on the NEON tier, and `mfx run` of the tiny pack.
# 5. macOS: the workspace compiled (and mfx linked) for aarch64-apple-darwin.
# 6. The pip wheel built, installed into a fresh venv and run.
# 7. Real coding agents (Claude Code, Codex CLI, Aider, pinned versions) run
#    against `mfx serve` on the tiny model (scripts/agents_e2e.sh): every
#    request must be answered and every stream well-formed (the tiny model
#    makes no tool calls, so the task itself is not asserted). About 3.5 min
#    of installs into target/ when cold, 2.5 min of runs; MFX_AGENTS_E2E=0
#    skips it.
# 8. The GPU kernels (gpu/, issue 24): their parity tests on Mesa's lavapipe
#    Vulkan driver and every shader translated to Metal (MSL), about 1.5 min
#    cold; MFX_GPU=off skips it, MFX_GPU=require fails where lavapipe cannot
#    be installed.
# Legs 4-8 install their own tools; one that cannot prints a SKIPPED banner.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR=never
cargo build --release --locked --bin mfx
bash scripts/check_intrinsics.sh target/release/mfx
cargo test --release --locked --workspace
MFX_KERNELS=scalar cargo test --release --locked --workspace -- parity
if cargo clippy --version >/dev/null 2>&1 || rustup component add clippy; then
  cargo clippy --release --locked --workspace --all-targets -- -D warnings
else
  echo "=== SKIPPED: clippy (not installed and rustup could not add it) ===" >&2
fi
if [ -x tests/server/run.sh ]; then
  bash tests/server/run.sh
fi
bash scripts/test_aarch64.sh
bash scripts/check_darwin.sh
bash scripts/test_wheel.sh
if [ "${MFX_AGENTS_E2E:-1}" = 0 ]; then
  echo "=== SKIPPED: agent clients (MFX_AGENTS_E2E=0) ===" >&2
elif ! command -v npm >/dev/null || ! npm ping >/dev/null 2>&1 \
    || ! python3 -m pip download --no-deps --quiet -d "$(mktemp -d)" "aider-chat==0.86.2" >/dev/null 2>&1; then
  echo "=== SKIPPED: agent clients (npm or PyPI unreachable, or npm missing) ===" >&2
else
  CLAUDE_CODE_VERSION=2.1.332 CODEX_VERSION=0.171.0 AIDER_VERSION=0.86.2 bash scripts/agents_e2e.sh
fi
if [ "${MFX_GPU:-on}" = off ]; then
  echo "=== SKIPPED: GPU kernels on lavapipe (MFX_GPU=off) ===" >&2
else
  bash scripts/gpu_test.sh
fi
