#!/usr/bin/env bash
# aarch64 leg of the test suite (scripts/test.sh runs it; issue 20).
#
# Cross-builds the kernel-sensitive test binaries for aarch64-unknown-linux-gnu
# and runs them under qemu-user with the NEON tier forced (MFX_KERNELS=neon),
# held to the same tolerances as AVX2 and scalar (the tests are the same; only
# the tier differs). Then the manylinux aarch64 wheel is built as the README
# builds it (maturin --zig), pip installs it for the aarch64 platform, and the
# installed `mfx` runs the tiny pack under qemu on NEON: it must print the same
# text as the host's scalar run.
#
# Installs what it needs (rustup target, Debian cross gcc/g++, qemu-user;
# maturin and zig as wheels into target/pytools).
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

# The manylinux aarch64 wheel, built the README's way (maturin --zig: zig links
# against glibc 2.17, so the wheel is manylinux2014) but with the ci-cross
# profile (Cargo.toml): release's thin LTO on 2 cores costs minutes, and what
# is checked here is the packaging and the NEON binary's output, not its speed.
# shellcheck source=scripts/pytools.sh
. scripts/pytools.sh
pytools_env || skip "pip install -r scripts/requirements-tools.txt (maturin, zig) failed: the aarch64 wheel and 'mfx run' were not tested"
version=$(mfx_version)
whl_dir=target/wheels-aarch64
rm -rf "$whl_dir"
t2=$(date +%s)
# zig is the C compiler and linker here; the gcc settings above are for the tests.
env -u CC_aarch64_unknown_linux_gnu -u CXX_aarch64_unknown_linux_gnu -u AR_aarch64_unknown_linux_gnu \
  -u CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER \
  maturin build --locked --zig --target "$TRIPLE" --profile ci-cross --out "$whl_dir"
whl=$(ls "$whl_dir"/mfx-"$version"-py3-none-*aarch64*.whl)
echo "aarch64: built $(basename "$whl") ($(du -h "$whl" | cut -f1), $(($(date +%s) - t2)) s)"
# pip installs it as an aarch64 machine would: it must accept the wheel's tags
# for a glibc 2.17 aarch64 platform and lay out bin/mfx from the wheel's scripts.
root=target/wheel-aarch64-root
rm -rf "$root"
python3 -m pip install --quiet --disable-pip-version-check --no-index --no-deps \
  --only-binary=:all: --platform manylinux2014_aarch64 --target "$root" "$whl"
exe=$root/bin/mfx
[ -x "$exe" ] || { echo "aarch64: pip did not install bin/mfx from $(basename "$whl")" >&2; exit 1; }
got=$(qemu-aarch64 -L "$SYSROOT" "$exe" --version)
[ "$got" = "mfx $version" ] || { echo "aarch64: installed mfx --version printed '$got', expected 'mfx $version'" >&2; exit 1; }

# `mfx run` on NEON must print what the host prints on the scalar tier.
pack=target/aarch64-tiny.mfx
run_args=(--prompt "def fibonacci(n):" --max-tokens 32 --temp 0)
env -u MFX_KERNELS "$host" prep models/tiny-qwen3-moe-coder-mlx-4bit --ram 96M -o "$pack" >/dev/null
want=$(MFX_KERNELS=scalar "$host" run "$pack" "${run_args[@]}" 2>/dev/null)
t3=$(date +%s)
got=$(qemu-aarch64 -L "$SYSROOT" "$exe" run "$pack" "${run_args[@]}" --stats 2>"$log")
# --stats names the tier that ran (a tier the CPU lacks falls back to scalar).
grep -qx 'kernels: neon' "$log" || { cat "$log" >&2; echo "aarch64: mfx did not run on the NEON tier" >&2; exit 1; }
if [ -z "$got" ] || [ "$got" != "$want" ]; then
  printf 'aarch64: mfx run on NEON differs from the host scalar run\n--- scalar (x86_64)\n%s\n--- neon (aarch64)\n%s\n' "$want" "$got" >&2
  exit 1
fi
rm -f "$pack"
echo "aarch64: pip-installed $(basename "$whl"): mfx --version and a tiny-pack run under qemu-aarch64 (neon) matching the x86_64 scalar run ($(($(date +%s) - t3)) s)"
