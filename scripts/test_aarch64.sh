#!/usr/bin/env bash
# aarch64 leg of the test suite (scripts/test.sh runs it; issue 20).
#
# Cross-builds the kernel-sensitive test binaries and the mfx binary for
# aarch64-unknown-linux-gnu and runs them under qemu-user with the NEON tier
# forced (MFX_KERNELS=neon), held to the same tolerances as AVX2 and scalar
# (the tests are the same; only the tier differs). Then `mfx run` of the tiny
# pack on NEON must print the same text as the host's scalar run.
#
# Installs what it needs (rustup target, Debian cross gcc/g++, qemu-user).
# Anything that cannot be installed makes this step print a loud SKIPPED
# banner and exit 0 (MFX_AARCH64=require turns that into a failure; =off skips
# on purpose). A test failure fails the step.
#
# Why the test profile and not release: release's thin LTO on 2 cores costs
# minutes per binary, and the test profile (opt-level 2/3) keeps qemu time low.
set -euo pipefail
cd "$(dirname "$0")/.."

TRIPLE=aarch64-unknown-linux-gnu
SYSROOT=/usr/aarch64-linux-gnu
mode=${MFX_AARCH64:-auto}

skip() {
  echo "################################################################" >&2
  echo "## aarch64 (NEON) tests SKIPPED: $*" >&2
  echo "## The NEON tier was NOT tested on this run." >&2
  echo "################################################################" >&2
  [ "$mode" = require ] && exit 1
  exit 0
}

[ "$mode" = off ] && skip "MFX_AARCH64=off"
[ "$(uname -m)" = x86_64 ] || skip "this leg cross-runs from x86_64 hosts only (host is $(uname -m))"

if ! rustup target list --installed 2>/dev/null | grep -qx "$TRIPLE"; then
  rustup target add "$TRIPLE" || skip "rustup target add $TRIPLE failed"
fi
if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v aarch64-linux-gnu-g++ >/dev/null ||
  ! command -v qemu-aarch64 >/dev/null; then
  command -v apt-get >/dev/null || skip "no apt-get to install gcc-aarch64-linux-gnu, g++-aarch64-linux-gnu, qemu-user"
  # The lock timeout: other jobs on a shared machine may be installing too.
  { apt-get -o DPkg::Lock::Timeout=600 update -qq &&
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
      gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user >/dev/null; } ||
    skip "apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user failed"
fi

export CARGO_TERM_COLOR=never
# The x86_64 mfx that scripts/test.sh builds: the reference output.
host=${CARGO_TARGET_DIR:-target}/release/mfx
[ -x "$host" ] || cargo build --release --locked --bin mfx
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export CXX_aarch64_unknown_linux_gnu=aarch64-linux-gnu-g++
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L $SYSROOT"
# Tests that re-execute their own binary prefix the child with this: under
# qemu-user a guest execve of an aarch64 file fails without binfmt_misc.
export MFX_TEST_REEXEC_RUNNER="qemu-aarch64 -L $SYSROOT"
# Line tables are enough for a backtrace; full debug info doubles link time.
export CARGO_PROFILE_TEST_DEBUG=line-tables-only
export MFX_KERNELS=neon

suites=(--test kernels --test parity --test parity_pack --test cache --test mlx_compat)
t0=$(date +%s)
cargo test --locked --target "$TRIPLE" -p mfx-runtime -p mfx-formats "${suites[@]}" --no-run
if [ "${MFX_AARCH64_RUN:-0}" = 1 ]; then
  cargo build --locked --target "$TRIPLE" --profile test --bin mfx
fi
echo "aarch64: cross-build took $(($(date +%s) - t0)) s"

# Every test binary prints "test result: ok. N passed; ..."; sum them so the
# log says how many NEON tests ran.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
t1=$(date +%s)
cargo test --locked --target "$TRIPLE" -p mfx-runtime -p mfx-formats "${suites[@]}" 2>&1 | tee "$log"
passed=$(grep -o '^test result: ok\. [0-9]* passed' "$log" | awk '{s += $4} END {print s + 0}')
echo "aarch64: $passed tests passed under qemu-aarch64 with MFX_KERNELS=neon ($(($(date +%s) - t1)) s)"
[ "$passed" -gt 0 ] || { echo "aarch64: no tests ran" >&2; exit 1; }

# `mfx run` on NEON must print what the host prints on the scalar tier.
# Opt-in for now: the aarch64 binary needs a second cross-build of the
# dependencies (no dev-dependency features), which doubles this leg's cold
# time, and the step has not yet been run end to end (issue 20 stays open).
if [ "${MFX_AARCH64_RUN:-0}" != 1 ]; then
  echo "################################################################" >&2
  echo "## aarch64: 'mfx run' of the tiny pack under qemu NOT RUN (set MFX_AARCH64_RUN=1)." >&2
  echo "################################################################" >&2
  exit 0
fi
exe=${CARGO_TARGET_DIR:-target}/$TRIPLE/debug/mfx
pack=target/aarch64-tiny.mfx
run_args=(--prompt "def fibonacci(n):" --max-tokens 32 --temp 0)
env -u MFX_KERNELS "$host" prep models/tiny-qwen3-moe-coder-mlx-4bit --ram 96M -o "$pack" >/dev/null
want=$(MFX_KERNELS=scalar "$host" run "$pack" "${run_args[@]}" 2>/dev/null)
t2=$(date +%s)
got=$(qemu-aarch64 -L "$SYSROOT" "$exe" run "$pack" "${run_args[@]}" --stats 2>"$log")
# --stats names the tier that ran (a tier the CPU lacks falls back to scalar).
grep -qx 'kernels: neon' "$log" || { cat "$log" >&2; echo "aarch64: mfx did not run on the NEON tier" >&2; exit 1; }
if [ "$got" != "$want" ]; then
  printf 'aarch64: mfx run on NEON differs from the host scalar run\n--- scalar (x86_64)\n%s\n--- neon (aarch64)\n%s\n' "$want" "$got" >&2
  exit 1
fi
echo "aarch64: mfx run of the tiny pack under qemu-aarch64 (neon) matches the x86_64 scalar run ($(($(date +%s) - t2)) s)"
