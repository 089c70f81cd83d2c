#!/usr/bin/env bash
# macOS leg of the test suite (scripts/test.sh runs it; issue 20): compiles the
# workspace for aarch64-apple-darwin so that code under
# cfg(target_os = "macos") (F_NOCACHE reads, sysctl memory queries) cannot
# break unnoticed. Nothing here RUNS on macOS: no Mac is available to CI.
#
# zig (the `ziglang` wheel) is the cross C compiler for the C dependencies
# (zstd-sys, onig_sys) and, through cargo-zigbuild (a wheel as well), the
# linker. `cargo zigbuild` links the mfx binary against zig's bundled macOS
# libSystem stubs. Where a piece cannot be installed, the step prints a loud
# SKIPPED banner and exits 0 (MFX_DARWIN=require fails instead, =off skips).
set -euo pipefail
cd "$(dirname "$0")/.."

TRIPLE=aarch64-apple-darwin
mode=${MFX_DARWIN:-auto}
skip() {
  echo "################################################################" >&2
  echo "## macOS (aarch64-apple-darwin) compile check SKIPPED: $*" >&2
  echo "## The macOS-specific code was NOT compiled on this run." >&2
  echo "################################################################" >&2
  [ "$mode" = require ] && exit 1
  exit 0
}
[ "$mode" = off ] && skip "MFX_DARWIN=off"

if ! rustup target list --installed 2>/dev/null | grep -qx "$TRIPLE"; then
  rustup target add "$TRIPLE" || skip "rustup target add $TRIPLE failed"
fi
# shellcheck source=scripts/pytools.sh
. scripts/pytools.sh
pytools_env || skip "pip install -r scripts/requirements-tools.txt (ziglang, cargo-zigbuild) failed"
export CARGO_TERM_COLOR=never

# 1. Every crate of the workspace with its tests, type-checked for macOS:
#    catches cfg(target_os = "macos") code that no longer compiles, in any
#    target. Build scripts run, so zstd-sys and onig_sys compile their C for
#    darwin with zig cc.
t0=$(date +%s)
# The library and binary code is what ships to a Mac; test targets and the
# link (MFX_DARWIN=full) cost CI minutes that are not spent by default yet.
if [ "$mode" = full ]; then
  cargo-zigbuild check --locked --target "$TRIPLE" --workspace --all-targets
else
  cargo-zigbuild check --locked --target "$TRIPLE" --workspace --lib --bins
fi
echo "darwin: cargo check of the workspace for $TRIPLE OK ($(($(date +%s) - t0)) s)"
if [ "$mode" != full ]; then
  echo "## darwin: mfx not linked on this run (MFX_DARWIN=full links it)" >&2
  exit 0
fi

# 2. The mfx binary compiled and linked for macOS (zig links against its
#    bundled libSystem stubs): catches missing symbols that checking cannot.
#    Unoptimized and without debug info: this proves it links, nothing runs it.
t1=$(date +%s)
cargo zigbuild --locked --target "$TRIPLE" --bin mfx \
  --config 'profile.dev.opt-level=0' --config 'profile.dev.debug=0' \
  --config 'profile.dev.package."*".opt-level=0'
bin=${CARGO_TARGET_DIR:-target}/$TRIPLE/debug/mfx
file_out=$(python3 - "$bin" <<'PY'
import struct, sys
with open(sys.argv[1], "rb") as f:
    magic, cputype = struct.unpack("<II", f.read(8))
# MH_MAGIC_64 and CPU_TYPE_ARM64: a 64-bit arm64 Mach-O executable.
print("ok" if (magic, cputype) == (0xFEEDFACF, 0x0100000C) else f"magic={magic:#x} cputype={cputype:#x}")
PY
)
[ "$file_out" = ok ] || { echo "darwin: $bin is not an arm64 Mach-O ($file_out)" >&2; exit 1; }
echo "darwin: mfx linked for $TRIPLE as an arm64 Mach-O ($(du -h "$bin" | cut -f1), $(($(date +%s) - t1)) s); not run: no Mac in CI"
